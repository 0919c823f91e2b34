"""Claims: the sentences that interpret a chapter's numbers, computed from them.

Introduced in the book's introduction ("How the text follows the numbers") and used by every chapter's
results cell. A *claim* has a name, an *outcome* computed from the recorded results, and one sentence
template per possible outcome; the sentence the outcome selects is recorded and glued, so the chapter's
markdown says ``{glue:}`claim_name``` and never types an interpretation by hand.

Outcomes come from small conditions that respect uncertainty:

* :func:`compare` ``(a, b)``: ``"greater"`` only when ``a``'s interval lies wholly above ``b``'s,
  ``"less"`` only when it lies wholly below, otherwise ``"indistinguishable"``; ``"no_data"`` when either
  is missing (NaN);
* :func:`within` ``(a, low, high)``: ``"inside"`` / ``"outside"`` a range, ``"indistinguishable"`` when
  ``a``'s interval straddles one of its ends;
* :func:`order` ``(first, second)``: how two sets of layers (or positions) are ordered;
* :func:`overlap` ``(a, b, n)``: whether two sets drawn from ``n`` items (each task's top heads, say) share
  more items than two random sets of their sizes would (a one-sided hypergeometric test);
* :func:`spans` writes a list of layers as runs (``"0–11, 14"``) for a sentence;
* :func:`precision_outcome` ``(copied, comparison, small)``: what a lower-precision copy changes, from a
  float32 rerun and a stated threshold;
* :func:`against_paper` ``(ours, paper)``: ``"as_paper"`` when our outcome is the paper's, ``"unlike_paper"``
  when it is a different one, ``"indistinguishable"`` / ``"no_data"`` when ours is.

:class:`Estimate` holds a value with its interval (:meth:`Estimate.bootstrap` over samples,
:meth:`Estimate.rate` for ``k`` of ``n``, :meth:`Estimate.share` of true flags, :meth:`Estimate.from_share` for a
recorded share, :meth:`Estimate.exact` for a number without uncertainty; :func:`bootstrap_stat` for any statistic of
resampled units).
:func:`record_claim` renders every outcome's sentence (so a typo in any of them fails at once), records
``{outcome, sentence, sentences, values}`` under ``results["claims"][name]`` and glues the selected
sentence under ``name``.
"""

from __future__ import annotations

import dataclasses
import math
import string
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from lmbook.core.stats import bootstrap_ci, wilson_interval

__all__ = ["ClaimError", "Estimate", "bootstrap_stat", "compare", "within", "order", "overlap", "against_paper",
           "spans", "precision_outcome",
           "record_claim", "COMPARE", "WITHIN", "ORDER", "OVERLAP", "PAPER", "PRECISION"]

COMPARE = ("greater", "less", "indistinguishable", "no_data")
WITHIN = ("inside", "outside", "indistinguishable", "no_data")
ORDER = ("before", "after", "overlap", "first_empty", "second_empty", "no_data")
OVERLAP = ("beyond_chance", "chance", "none", "no_data")
PAPER = ("as_paper", "unlike_paper", "indistinguishable", "no_data")
PRECISION = ("small", "large", "unchecked", "exact")


class ClaimError(ValueError):
    """A claim or estimate with a bad value (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A value with its interval ``low <= value <= high``; all three NaN means "no data".

    ``format(e, ".2f")`` gives ``"0.53 [0.40, 0.66]"``; ``e.value``/``e.low``/``e.high`` one number each.
    """

    value: float
    low: float
    high: float

    def __post_init__(self):
        v = [float(x) for x in (self.value, self.low, self.high)]
        nan = [math.isnan(x) for x in v]
        if any(nan) and not all(nan):
            raise ClaimError(f"estimate {v[0]} with interval [{v[1]}, {v[2]}]: give all three numbers or none (NaN)")
        if not all(nan) and not v[1] <= v[0] <= v[2]:
            raise ClaimError(f"interval [{v[1]}, {v[2]}] does not contain its estimate {v[0]}")
        for name, x in zip(("value", "low", "high"), v):
            object.__setattr__(self, name, x)

    @property
    def missing(self) -> bool:
        return math.isnan(self.value)

    @classmethod
    def exact(cls, value: float) -> "Estimate":
        """A number without uncertainty (a count, a layer, a paper's figure)."""
        return cls(value, value, value)

    @classmethod
    def bootstrap(cls, samples, seed: int = 0) -> "Estimate":
        """Mean of ``samples`` (1-D; NaNs dropped) with its 95% percentile-bootstrap interval; NaN if empty."""
        x = np.asarray(samples, dtype=float).ravel()
        x = x[~np.isnan(x)]
        if x.size == 0:
            return cls(math.nan, math.nan, math.nan)
        m, lo, hi = (float(v) for v in bootstrap_ci(x, seed=seed))
        return cls(m, min(lo, m), max(hi, m))

    @classmethod
    def rate(cls, k: int, n: int) -> "Estimate":
        """``k / n`` with its Wilson interval; NaN for ``n = 0``."""
        if n == 0:
            return cls(math.nan, math.nan, math.nan)
        lo, hi = wilson_interval(int(k), int(n))
        return cls(k / n, lo, hi)

    @classmethod
    def from_share(cls, p, n: int) -> "Estimate":
        """A recorded share ``p`` of ``n`` items (``round(p * n)`` of ``n``) with its Wilson interval; NaN when
        ``p`` is missing (None or NaN) or ``n = 0``."""
        if p is None or n == 0 or math.isnan(float(p)):
            return cls(math.nan, math.nan, math.nan)
        if not 0.0 <= float(p) <= 1.0:
            raise ClaimError(f"share {p} is not between 0 and 1")
        return cls.rate(round(float(p) * int(n)), int(n))

    @classmethod
    def share(cls, flags) -> "Estimate":
        """The share of true ``flags`` (a boolean array or tensor) with its Wilson interval; NaN if empty."""
        x = np.asarray(flags, dtype=bool).ravel()
        return cls.rate(int(x.sum()), int(x.size))

    def __format__(self, spec: str) -> str:
        if self.missing:
            return "nan"
        f = (lambda x: format(round(x), spec)) if spec.endswith("d") else (lambda x: format(x, spec))
        if self.low == self.high:
            return f(self.value)
        return f"{f(self.value)} [{f(self.low)}, {f(self.high)}]"

    def to_json(self) -> dict:
        return {k: (None if math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


def _estimate(x) -> Estimate:
    if isinstance(x, Estimate):
        return x
    if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
        return Estimate.exact(float(x))
    raise ClaimError(f"expected an Estimate or a number, got {type(x).__name__}: {x!r}")


def compare(a, b) -> str:
    """``"greater"`` / ``"less"`` when the intervals of ``a`` and ``b`` separate, else ``"indistinguishable"``;
    ``"no_data"`` when either is NaN. Plain numbers count as exact."""
    a, b = _estimate(a), _estimate(b)
    if a.missing or b.missing:
        return "no_data"
    if a.low > b.high:
        return "greater"
    if a.high < b.low:
        return "less"
    return "indistinguishable"


def within(a, low: float, high: float) -> str:
    """``"inside"`` when ``a``'s interval lies in ``[low, high]``, ``"outside"`` when it lies wholly outside,
    ``"indistinguishable"`` when it straddles an end; ``"no_data"`` when ``a`` is NaN."""
    a = _estimate(a)
    if not low <= high:
        raise ClaimError(f"range [{low}, {high}] is empty")
    if a.missing:
        return "no_data"
    if low <= a.low and a.high <= high:
        return "inside"
    if a.high < low or a.low > high:
        return "outside"
    return "indistinguishable"


def order(first, second) -> str:
    """How two sets of layers are ordered: ``"before"`` (every one of ``first`` precedes every one of
    ``second``), ``"after"``, ``"overlap"``; ``"first_empty"`` / ``"second_empty"`` / ``"no_data"`` (both)."""
    first, second = sorted(int(x) for x in first), sorted(int(x) for x in second)
    if not first and not second:
        return "no_data"
    if not first:
        return "first_empty"
    if not second:
        return "second_empty"
    if first[-1] < second[0]:
        return "before"
    if second[-1] < first[0]:
        return "after"
    return "overlap"


def overlap(a, b, n: int, level: float = 0.95) -> str:
    """Whether the sets ``a`` and ``b``, both drawn from ``n`` items, share more than chance would give:
    ``"beyond_chance"`` when two random sets of their sizes share at least as many items with probability
    below ``1 - level`` (hypergeometric tail), ``"none"`` when they share nothing, ``"chance"`` otherwise;
    ``"no_data"`` when either is empty."""
    a, b = set(a), set(b)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < len(a | b):
        raise ClaimError(f"n={n!r} must be a whole number of items, at least the {len(a | b)} the two sets hold")
    if not 0.0 < level < 1.0:
        raise ClaimError(f"level={level!r} must lie between 0 and 1")
    if not a or not b:
        return "no_data"
    k, ka, kb = len(a & b), len(a), len(b)
    if k == 0:
        return "none"
    tail = sum(math.comb(ka, j) * math.comb(n - ka, kb - j) for j in range(k, min(ka, kb) + 1)) / math.comb(n, kb)
    return "beyond_chance" if tail < 1.0 - level else "chance"


def spans(layers) -> str:
    """Whole numbers as runs for a sentence: ``[0, 1, 2, 5, 7, 8]`` -> ``"0–2, 5, 7–8"``; ``"none"`` if empty."""
    xs, runs = sorted({int(x) for x in layers}), []
    for x in xs:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs) or "none"


def against_paper(ours: str, paper: str) -> str:
    """Our outcome against the outcome a paper reports (both from the same condition):
    ``"as_paper"``, ``"unlike_paper"``, or ours when it is ``"indistinguishable"`` or ``"no_data"``."""
    for name, o in (("ours", ours), ("paper", paper)):
        if not isinstance(o, str) or not o:
            raise ClaimError(f"{name}={o!r} is not an outcome")
    if paper in ("indistinguishable", "no_data"):
        raise ClaimError(f"paper={paper!r}: a paper's finding must be a definite outcome")
    if ours in ("indistinguishable", "no_data"):
        return ours
    return "as_paper" if ours == paper else "unlike_paper"


def precision_outcome(copied: bool, comparison, small: Callable[[Any], bool]) -> str:
    """The outcome of a chapter's precision claim (:data:`PRECISION`): ``"exact"`` when the loops ran
    on the model itself (``copied`` false: no lower-precision copy was made), ``"unchecked"`` when a
    copy ran but no float32 comparison did (``comparison`` is ``None`` or empty), otherwise
    ``"small"`` when ``small(comparison)`` holds (the chapter's stated threshold) and ``"large"``
    when it does not."""
    if not copied:
        return "exact"
    if comparison is None or (hasattr(comparison, "__len__") and len(comparison) == 0):
        return "unchecked"
    return "small" if bool(small(comparison)) else "large"


def _jsonable(v):
    if isinstance(v, Estimate):
        return v.to_json()
    if isinstance(v, (np.integer, np.floating)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def render(name: str, sentences: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, str]:
    """Every outcome's sentence, formatted with ``values`` (``str.format`` fields such as ``{p:.2f}``)."""
    if not isinstance(sentences, Mapping) or not sentences:
        raise ClaimError(f"claim {name!r}: give sentences as a non-empty {{outcome: template}} dict")
    out = {}
    for outcome, template in sentences.items():
        if not isinstance(template, str) or not template.strip():
            raise ClaimError(f"claim {name!r}: the sentence for {outcome!r} is not a non-empty string")
        for _, field, _, _ in string.Formatter().parse(template):
            root = field.split(".")[0].split("[")[0] if field else field
            if root and root not in values:
                raise ClaimError(f"claim {name!r}: the sentence for {outcome!r} uses {{{root}}}, "
                                 f"which is not among its values {sorted(values)}")
        try:
            out[outcome] = template.format(**values)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise ClaimError(f"claim {name!r}: cannot format the sentence for {outcome!r}: {exc}") from None
    return out


def record_claim(rec, name: str, outcome: str, sentences: Mapping[str, str], **values) -> str:
    """Record claim ``name`` with its computed ``outcome`` on the :class:`~lmbook.core.records.Recorder`
    ``rec`` and glue the sentence the outcome selects under ``name``; returns that sentence.

    ``sentences`` maps each outcome the condition can give to a template; ``values`` fill the templates
    (:class:`Estimate`, numbers, strings, lists). An outcome without a sentence is an error.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ClaimError(f"claim name {name!r} must be an identifier (it is a glue key)")
    if not isinstance(outcome, str) or outcome not in sentences:
        raise ClaimError(f"claim {name!r}: outcome {outcome!r} has no sentence; sentences are given for "
                         f"{list(sentences) if isinstance(sentences, Mapping) else sentences!r}")
    rendered = render(name, sentences, values)
    claims = dict(rec.results.get("claims", {}))
    claims[name] = {"outcome": outcome, "sentence": rendered[outcome], "sentences": rendered,
                    "values": {k: _jsonable(v) for k, v in values.items()}}
    rec.record("claims", claims, glue=False)
    rec.record(name, rendered[outcome])
    return rendered[outcome]


def bootstrap_stat(x, stat: Callable[[np.ndarray], float], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> Estimate:
    """``stat(x)`` with its percentile-bootstrap interval from resampling the rows of ``x`` (the units: facts,
    prompts, runs); the interval is widened to contain the estimate. NaN (no data) with fewer than two rows,
    where there is no spread to resample, or when ``stat(x)`` is NaN. NaN statistics of single resamples are
    ignored. Chapters 2 and 3 use it for intervals over facts and over training runs."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return Estimate(math.nan, math.nan, math.nan)
    with warnings.catch_warnings():  # nanmean / nanmax of a position no fact has
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(stat(x))
        if math.isnan(value):
            return Estimate(math.nan, math.nan, math.nan)
        idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
        boots = np.array([float(stat(x[i])) for i in idx])
    a = (1 - level) / 2
    lo, hi = np.nanquantile(boots, [a, 1 - a])
    return Estimate(value, min(float(lo), value), max(float(hi), value))


# --- What the book finds: one verdict per chapter, pasted into the introduction's table -----------------------

VERDICT = ("reproduced", "partly", "not", "no_data")
VERDICT_TEXT = {"reproduced": "reproduced", "partly": "partly", "not": "not reproduced", "no_data": "not tested"}
FINDING_KEYS = ("finding_verdict", "finding_basis", "finding_measured", "finding_compare")
UNTESTED = ("no_data",)


def paper_verdict(claims: Mapping[str, Mapping], agree: Mapping[str, Any],
                  untested: tuple = UNTESTED) -> tuple[str, int, int, int]:
    """Whether a chapter reproduced its paper, from the outcomes of the claims that test the paper's finding.

    ``claims`` is a chapter's ``results["claims"]`` (:func:`record_claim`); ``agree`` maps each claim that tests
    the paper to the outcome (or tuple of outcomes) that agrees with what the paper reports, e.g.
    ``{"claim_lens_vs_paper": "as_paper", "claim_topic_effect": "greater"}``. A claim whose outcome is in
    ``untested`` (by default ``"no_data"``) could not be tested by this run. Returns ``(verdict, agreeing,
    tested, listed)``: ``"reproduced"`` when every listed claim agrees, ``"partly"`` when some do, ``"not"``
    when none does although some were tested, ``"no_data"`` when none could be tested. A claim that is not
    recorded, or an outcome that the claim cannot have (no sentence for it), is an error naming it.
    """
    if not isinstance(agree, Mapping) or not agree:
        raise ClaimError("agree: give {claim name: outcome agreeing with the paper} for at least one claim")
    n_agree = n_tested = 0
    for name, outcomes in agree.items():
        if name not in claims:
            raise ClaimError(f"finding: claim {name!r} is not recorded; recorded claims: {sorted(claims)}")
        outcomes = (outcomes,) if isinstance(outcomes, str) else tuple(outcomes)
        possible = set(claims[name].get("sentences", {}))
        bad = [o for o in outcomes if o not in possible]
        if not outcomes or bad:
            raise ClaimError(f"finding: claim {name!r} has no outcome {bad or outcomes!r}; "
                             f"its outcomes are {sorted(possible)}")
        outcome = claims[name]["outcome"]
        if outcome in untested:
            continue
        n_tested += 1
        n_agree += outcome in outcomes
    n = len(agree)
    verdict = ("no_data" if n_tested == 0 else "reproduced" if n_agree == n else "partly" if n_agree
               else "not")
    return verdict, n_agree, n_tested, n


def record_finding(rec, agree: Mapping[str, Any], measured: str, compare: str,
                   untested: tuple = UNTESTED) -> str:
    """Record and glue a chapter's row of the introduction's table "What the book finds"; returns the verdict.

    ``agree`` and ``untested`` are :func:`paper_verdict`'s, applied to the claims ``rec`` holds (call this after
    the chapter's claims). ``measured`` is one line, computed from this run's results, on what the chapter
    measured on its ``MODEL`` (name the model in it); ``compare`` the same for the other packaged model (or
    says that this run did not measure it). Glues ``finding_verdict`` (reproduced / partly / not reproduced /
    not tested), ``finding_basis`` (how many of the paper's checks agree), ``finding_measured`` and
    ``finding_compare``; records all of it under ``results["finding"]``.
    """
    for key, text in (("measured", measured), ("compare", compare)):
        if not isinstance(text, str) or not text.strip():
            raise ClaimError(f"finding: {key}={text!r} must be a non-empty sentence")
    verdict, k, tested, n = paper_verdict(rec.results.get("claims", {}), agree, untested)
    basis = f"{k} of {n} checks agree with the paper" + (f", {n - tested} not testable here" if tested < n else "")
    rec.record("finding", {"verdict": verdict, "agree": {c: rec.results["claims"][c]["outcome"] for c in agree},
                           "agreeing": k, "tested": tested, "checks": n}, glue=False)
    for key, text in zip(FINDING_KEYS, (VERDICT_TEXT[verdict], basis, measured, compare)):
        rec.record(key, text)
    return verdict


__all__ += ["VERDICT", "VERDICT_TEXT", "FINDING_KEYS", "paper_verdict", "record_finding"]
