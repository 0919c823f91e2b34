"""Dissecting factual recall (Geva et al. 2023): which facts a model knows, attention knockout from
the last position, subject enrichment, and attribute extraction. Introduced in chapter 2.

The chapter runs each protocol with one call per model, each returning a small dataclass:

* :func:`known_mask` / :func:`sample_known` / :func:`known_by_relation`: the facts a model knows
  (its top-1 next token is the attribute's first token) and the seeded sample the experiments use;
* :func:`run_knockout` -> :class:`KnockoutRun`: the attribute's probability when the last position
  cannot read the subject, the other tokens, or itself in a window of layers (by default the paper's
  share of the depth, :func:`knockout_window`), with the start token first and never blocked
  (:mod:`lmbook.mechanisms.knockout`); :func:`sink_share` compares it with a run without the start token;
* :func:`run_enrichment` -> :class:`EnrichmentRun`: the **attributes rate** by layer and position, as
  Geva et al.'s code computes it: of the top :data:`POOL` tokens read from a hidden state with the
  logit lens (:func:`lmbook.mechanisms.readout.logit_lens`), stop words and tokens of two characters or
  fewer are dropped, the first :data:`KEEP` are kept, and the number of them related to the subject
  (:func:`lmbook.data.facts.related_token_sets`, minus the words of the attribute asked for) is
  divided by :data:`KEEP`;
* :func:`run_sublayer_knockout` -> :class:`SublayerRun`: the same rate at the subject's last token of
  a late layer when the MLP or attention updates of a window of earlier layers are cancelled;
* :func:`run_extraction` -> :class:`ExtractionRun`: at the last position, whether the update an
  attention or MLP sublayer adds to the residual stream, projected by the unembedding, has the
  predicted attribute as its top token (clean, and the attention update recomputed with the last
  position's weights on the subject zeroed at that layer only, as in Geva et al.'s code; the book's
  earlier propagated measure is kept as a labelled variant);
* :func:`paper_items`: chapter 2's table of protocol items, the paper's value beside this run's;
* :func:`paper_comparison`: for each of the paper's findings (:data:`PAPER_FINDINGS`), this run's outcome against the
  paper's (a claim's outcome, :mod:`lmbook.core.claims`) with the estimates it rests on, each with a 95% bootstrap
  interval over facts (:func:`lmbook.core.claims.bootstrap_stat`; the dataclasses' ``dip_layers``, ``peak_gap``,
  ``early_drops``, ``hits`` and ``difference`` helpers).

Causal tracing (ROME), which the chapter sets beside these, is :mod:`lmbook.experiments.causal_tracing`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from lmbook.core.claims import Estimate, against_paper, bootstrap_stat, compare, within
from lmbook.core.models import model_device, trace
from lmbook.core.params import ParameterError, check_int, check_layer
from lmbook.core.stats import bootstrap_ci
from lmbook.core.tokens import Batch, encode, token_span
from lmbook.data.facts import STOPWORDS, Fact, answer_token_ids, related_token_sets, word_pieces
from lmbook.mechanisms.knockout import (
    KINDS,
    POSITIONS,
    WINDOW_FRACTION,
    FactGroup,
    group_facts,
    key_masks,
    last_token_run,
    position_index,
    relative_window,
    same_layer_blocked,
    sweep_facts,
)
from lmbook.mechanisms.readout import logit_lens, next_token, unembed
from lmbook.mechanisms.sublayers import sublayer_updates

__all__ = ["known_mask", "sample_known", "known_by_relation", "KnockoutRun", "run_knockout", "knockout_window",
           "sink_share", "EnrichmentRun", "run_enrichment", "SublayerRun", "run_sublayer_knockout",
           "sublayer_knockout_topk", "ExtractionRun", "run_extraction", "extraction_events", "extraction_facts",
           "same_layer_events", "attributes_rate", "attributes_rates", "TokenText", "POOL", "KEEP",
           "PAPER_FINDINGS", "PAPER_ROWS", "paper_comparison", "PAPER_ITEMS", "paper_items",
           "DISSECTION_MEASURES", "dissection_curves", "dissection_precision"]


# ---------------------------------------------------------------- which facts a model knows


def known_mask(model, facts: Sequence[Fact], batch_size: int = 64, start: bool = True) -> torch.Tensor:
    """Which facts the model knows: its top-1 next token after the prompt (encoded with the start
    token first, :func:`lmbook.core.tokens.encode`, unless ``start=False``) is the attribute's first
    token. Returns a bool tensor ``[N]``. Chapter 2 dissects only these facts."""
    check_int("batch_size", batch_size, 1)
    targets = answer_token_ids(model, facts)
    order = sorted(range(len(facts)), key=lambda i: len(facts[i].prompt))
    top1 = torch.empty(len(facts), dtype=torch.long)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        top1[idx] = next_token(model, encode(model, [facts[i].prompt for i in idx], start=start)).top1[0]
    return top1 == targets


def sample_known(known: dict[str, torch.Tensor], max_facts: int, seed: int = 0) -> dict[str, list[int]]:
    """For each model (in the order of ``known``, one generator seeded with ``seed`` for all), a
    sorted random sample of at most ``max_facts`` indices of the facts it knows. Raises
    :class:`ParameterError` when a model knows none of them."""
    check_int("MAX_FACTS", max_facts, 1)
    rng = np.random.default_rng(seed)
    chosen = {}
    for name, mask in known.items():
        idx = np.flatnonzero(mask.numpy())
        if len(idx) == 0:
            raise ParameterError(f"{name} knows none of the {len(mask)} facts in FACTS_PATH; nothing to dissect")
        chosen[name] = sorted(rng.choice(idx, size=min(max_facts, len(idx)), replace=False).tolist())
    return chosen


def known_by_relation(facts: Sequence[Fact], known: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Facts per relation and how many of them each model knows, with a closing ``all`` row."""
    relations = sorted({f.relation for f in facts})
    rel_of = np.array([f.relation for f in facts])
    table = pd.DataFrame({"facts": [int((rel_of == r).sum()) for r in relations]}, index=relations)
    for name, mask in known.items():
        table[name] = [int(mask[torch.from_numpy(rel_of == r)].sum()) for r in relations]
    table.loc["all"] = table.sum()
    return table


def _prompts_subjects(facts: Sequence[Fact]) -> tuple[list[str], list[str]]:
    return [f.prompt for f in facts], [f.subject for f in facts]


# ---------------------------------------------------------------- attention knockout


@dataclasses.dataclass
class KnockoutRun:
    """Attention knockout from the last position (:func:`run_knockout`) for ``F`` facts and ``L`` layers.

    * ``changes[kind]``: ``[F, L]`` relative change (%) of the attribute's probability when the last
      position cannot read ``kind`` (:data:`lmbook.mechanisms.knockout.KINDS`) in the window centred
      on each layer
    * ``clean``: ``[F]`` the attribute's probability without knockout
    * ``window``: the window size (layers)
    * ``start``: whether the prompts began with the start token (never blocked), as by default
    """

    changes: dict[str, np.ndarray]
    clean: np.ndarray
    window: int
    start: bool = True

    @property
    def n_facts(self) -> int:
        """The number of facts ``F``."""
        return len(self.clean)

    @property
    def n_layers(self) -> int:
        return self.changes[KINDS[0]].shape[1]

    def curves(self) -> dict[str, np.ndarray]:
        """Mean change (%) over facts, ``{kind: [L]}``."""
        return {kind: self.changes[kind].mean(0) for kind in KINDS}

    def largest_drop(self, kind: str) -> tuple[float, int, float]:
        """``(value, layer, depth)``: the most negative mean change (%), the centre layer of its
        window, and that layer's relative depth ``layer / (L - 1)``."""
        mean = self.changes[kind].mean(0)
        layer = int(mean.argmin())
        return float(mean.min()), layer, layer / (self.n_layers - 1)

    def dip_layers(self, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
        """The layer of each kind's largest mean drop (:meth:`largest_drop`) with a 95% bootstrap interval
        over facts, and ``"subject - non-subject"``: the subject dip's layer minus the non-subject dip's,
        both from the same resampled facts (positive: the last position needs the subject later than the
        other tokens, as Geva et al. find). NaN with fewer than two facts."""
        out = {kind: bootstrap_stat(self.changes[kind], lambda c: c.mean(0).argmin(), n_boot, seed) for kind in KINDS}
        both = np.stack([self.changes["subject"], self.changes["non-subject"]], 1)  # [F, 2, L]
        out["subject - non-subject"] = bootstrap_stat(
            both, lambda c: c[:, 0].mean(0).argmin() - c[:, 1].mean(0).argmin(), n_boot, seed)
        return out

    def drop_at(self, kind: str, layer: int, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """Mean change (%) for the window centred on ``layer``, with a 95% bootstrap interval over facts."""
        return bootstrap_stat(self.changes[kind][:, layer], np.mean, n_boot, seed)


def knockout_window(model, window: int = 0, fraction: float = WINDOW_FRACTION) -> int:
    """The knockout window for ``model``: ``window`` layers when it is positive, else the paper's relative
    depth (:func:`lmbook.mechanisms.knockout.relative_window`: ``fraction`` of the layers, odd, at least 3)."""
    check_int("WINDOW", window, 0, model.num_layers)
    return window if window > 0 else relative_window(model.num_layers, fraction)


def run_knockout(model, facts: Sequence[Fact], window: int = 0, progress: bool = True, start: bool = True,
                 fraction: float = WINDOW_FRACTION) -> KnockoutRun:
    """Geva et al.'s attention knockout: every kind (:data:`~lmbook.mechanisms.knockout.KINDS`) in a
    window of layers around every layer, for every fact, batched by
    :func:`lmbook.mechanisms.knockout.sweep_facts`. ``window``: layers, or 0 for the paper's relative
    depth (:func:`knockout_window`). ``start=False`` encodes the prompts without the start token
    (the variant chapter 2 shows: where the tokenizer adds no BOS, position 0 is then a word of the
    prompt, which the knockouts may block)."""
    window = knockout_window(model, window, fraction)
    prompts, subjects = _prompts_subjects(facts)
    probs = sweep_facts(model, prompts, subjects, answer_token_ids(model, facts), window=window, progress=progress,
                        start=start)
    L = model.num_layers
    changes = {kind: ((probs[:, 1 + k * L:1 + (k + 1) * L] / probs[:, :1]) - 1).numpy() * 100
               for k, kind in enumerate(KINDS)}
    return KnockoutRun(changes, probs[:, 0].numpy(), window, start)


def sink_share(fixed: KnockoutRun, bare: KnockoutRun, kind: str = "subject", n_boot: int = 1000,
               seed: int = 0) -> dict[str, Estimate]:
    """How much of the knockout effect measured without the start token (``bare``) the start token
    removes (``fixed``; the same facts in the same order): ``"bare"`` and ``"fixed"``, each curve's
    largest mean drop (%, at its own layer), and ``"share"``, ``1 - fixed / bare`` (the share of the bare
    drop that was the attention sink, when position 0 was a word the knockout blocked), each with a 95%
    bootstrap interval over facts (the same resampled facts for both runs)."""
    if kind not in KINDS:
        raise ParameterError(f"unknown knockout kind {kind!r}; valid: {list(KINDS)}")
    a, b = fixed.changes[kind], bare.changes[kind]
    if a.shape != b.shape:
        raise ParameterError(f"the two runs must cover the same facts and layers, got {a.shape} and {b.shape}")
    both = np.stack([a, b], 1)  # [F, 2, L]

    def share(c):
        lo_b = c[:, 1].mean(0).min()
        return 1 - c[:, 0].mean(0).min() / lo_b if lo_b < 0 else math.nan

    return {"fixed": bootstrap_stat(both, lambda c: c[:, 0].mean(0).min(), n_boot, seed),
            "bare": bootstrap_stat(both, lambda c: c[:, 1].mean(0).min(), n_boot, seed),
            "share": bootstrap_stat(both, share, n_boot, seed)}


# ---------------------------------------------------------------- attributes rate


class TokenText:
    """Decoded, stripped, lower-cased text of token ids, cached (decoding is the slow part)."""

    def __init__(self, model):
        self.tok = getattr(model, "tokenizer", model)
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            self.cache[i] = self.tok.decode([i]).strip().lower()
        return self.cache[i]

    def content(self, i: int) -> bool:
        """Whether token ``i`` is a content token: not a stop word, longer than two characters."""
        t = self(i)
        return len(t) > 2 and t not in STOPWORDS


POOL = 500
"""Tokens read per projection in the attributes rate (Geva et al.'s reference: the top 500)."""
KEEP = 50
"""Content tokens kept of those (the first 50 that are no stop word and longer than two characters)."""


def _kept(ids: np.ndarray, text: TokenText, keep: int) -> np.ndarray:
    """Bool mask of ``ids`` ``[..., pool]`` (best first): the first ``keep`` content tokens of each list
    (not stop words, longer than two characters once stripped)."""
    uniq, inv = np.unique(ids, return_inverse=True)
    content = np.array([text.content(int(i)) for i in uniq], dtype=bool)[inv.reshape(ids.shape)]
    return content & (np.cumsum(content, axis=-1) <= keep)


def _rates_kept(ids: np.ndarray, kept: np.ndarray, related: frozenset[str], text: TokenText, keep: int) -> np.ndarray:
    """Rates of the lists ``ids`` given their kept tokens: related kept tokens divided by ``keep``."""
    good = [i for i in np.unique(ids[kept]) if text(int(i)) in related]
    return (kept & np.isin(ids, good)).sum(-1) / keep


def attributes_rates(ids, related: Sequence[frozenset[str]], text: TokenText, keep: int = KEEP) -> np.ndarray:
    """Geva et al.'s attributes rate, vectorised: ``ids`` ``[F, ..., pool]`` top token ids per projection
    (best first), ``related[f]`` the related words of fact ``f``. Of each list, the first ``keep`` content
    tokens (not stop words, longer than two characters once stripped) are kept, and the rate is the
    number of them whose text is in ``related`` divided by ``keep``, as the reference computes it
    (a list with fewer content tokens is not rescaled). Returns ``[F, ...]`` fractions."""
    ids = np.asarray(ids)
    check_int("keep", keep, 1)
    if len(related) != len(ids):
        raise ParameterError(f"{len(ids)} facts of ids but {len(related)} related-word sets")
    out = np.zeros(ids.shape[:-1])
    for f in range(len(ids)):
        out[f] = _rates_kept(ids[f], _kept(ids[f], text, keep), related[f], text, keep)
    return out


def attributes_rate(ids: torch.Tensor, related: frozenset[str], text: TokenText, keep: int = KEEP) -> float:
    """Attributes rate of one top-token list ``ids`` ``[pool]`` (:func:`attributes_rates` for one list)."""
    return float(attributes_rates(np.asarray(ids)[None], [related], text, keep)[0])


def _vocab_size(model) -> int:
    return int(model.lm_head._module.weight.shape[0])


def _other_attributes(model, facts: Sequence[Fact], descriptions: dict[str, str]) -> list[frozenset[str]]:
    """Per fact, the words related to its subject minus the words of the attribute asked for (the
    measure counts the *other* attributes a representation carries, not the answer)."""
    related = related_token_sets(model, facts, descriptions)
    return [related[f.subject] - word_pieces(model, f.attribute) for f in facts]


def _subject_batch(model, facts: Sequence[Fact]) -> tuple[Batch, torch.Tensor]:
    """The facts' prompts encoded with the start token first, and each subject's token span ``[B, 2]``."""
    b = encode(model, [f.prompt for f in facts], start=True)
    return b, torch.tensor([token_span(b, i, f.subject) for i, f in enumerate(facts)])


@dataclasses.dataclass
class EnrichmentRun:
    """Attributes rate by layer (:func:`run_enrichment`): ``rates`` ``[F, L, 4]`` (fractions, NaN
    where a fact has no such position) at the positions :data:`~lmbook.mechanisms.knockout.POSITIONS`;
    ``top_k``: content tokens kept per projection (of the top ``pool``); ``variants``: the same rates
    with other related-word sets, ``{label: [F, L, 4]}`` (chapter 2: descriptions cut to their first
    words), read from the same projections."""

    rates: np.ndarray
    top_k: int
    pool: int = POOL
    variants: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def n_facts(self) -> int:
        """The number of facts ``F``."""
        return len(self.rates)

    def curve(self, position: str) -> np.ndarray:
        """Mean rate (%) over facts by layer at ``position``, ``[L]``."""
        return np.nanmean(self.rates[:, :, POSITIONS.index(position)], axis=0) * 100

    def curves(self) -> dict[str, np.ndarray]:
        """Mean rate (fraction) over facts by layer, ``{position: [L]}``."""
        return {p: np.nanmean(self.rates[:, :, i], 0) for i, p in enumerate(POSITIONS)}

    def peak(self, position: str) -> tuple[float, int]:
        """``(rate %, layer)`` of the highest mean rate at ``position``."""
        mean = self.curve(position)
        return float(np.nanmax(mean)), int(np.nanargmax(mean))

    def peak_gap(self, position: str, other: str, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """Peak mean rate at ``position`` minus peak mean rate at ``other`` (percentage points, each peak
        at its own layer), with a 95% bootstrap interval over facts; NaN when a position has no data."""
        a, b = POSITIONS.index(position), POSITIONS.index(other)
        return bootstrap_stat(self.rates, lambda r: (np.nanmax(np.nanmean(r[:, :, a], 0))
                                                     - np.nanmax(np.nanmean(r[:, :, b], 0))) * 100, n_boot, seed)

    def peak_estimate(self, position: str = "subject last", variant: str | None = None, n_boot: int = 1000,
                      seed: int = 0) -> Estimate:
        """The peak mean rate (%) at ``position`` (of ``variant``'s rates, or the main ones), with a 95%
        bootstrap interval over facts."""
        r = self.rates if variant is None else self.variants[variant]
        i = POSITIONS.index(position)
        return bootstrap_stat(r[:, :, i], lambda x: np.nanmax(np.nanmean(x, 0)) * 100, n_boot, seed)

    def variant_gap(self, variant: str, other: str, position: str = "subject last", n_boot: int = 1000,
                    seed: int = 0) -> Estimate:
        """Peak mean rate (%) at ``position`` with ``variant``'s related words minus that with ``other``'s
        (``None``: the main set), from the same resampled facts; a 95% bootstrap interval over facts."""
        i = POSITIONS.index(position)
        ra = self.rates if variant is None else self.variants[variant]
        rb = self.rates if other is None else self.variants[other]
        both = np.stack([ra[:, :, i], rb[:, :, i]], 1)
        return bootstrap_stat(both, lambda x: (np.nanmax(np.nanmean(x[:, 0], 0))
                                               - np.nanmax(np.nanmean(x[:, 1], 0))) * 100, n_boot, seed)


def run_enrichment(model, facts: Sequence[Fact], descriptions: dict[str, str], top_k: int = KEEP,
                   batch_size: int = 16, pool: int = POOL, variants: dict[str, dict[str, str]] | None = None
                   ) -> EnrichmentRun:
    """Geva et al.'s attributes rate of the residual stream after every layer, at the subject's
    first and last tokens, the token after the subject and the last token: one logit-lens forward
    per ``batch_size`` facts, reading the top ``pool`` tokens of each projection and keeping the first
    ``top_k`` content tokens (:func:`attributes_rates`). ``variants``: other descriptions
    (``{label: {subject: description}}``) scored on the same projections."""
    check_int("TOP_K", top_k, 1, 1000)
    check_int("pool", pool, top_k, 1000)
    pool = min(pool, _vocab_size(model))
    sets = {None: _other_attributes(model, facts, descriptions)}
    for label, d in (variants or {}).items():
        sets[label] = _other_attributes(model, facts, d)
    text = TokenText(model)
    out = {label: np.full((len(facts), model.num_layers, len(POSITIONS)), np.nan) for label in sets}
    for s in range(0, len(facts), batch_size):
        b, spans = _subject_batch(model, facts[s:s + batch_size])
        pos = position_index(b, spans)
        ids = logit_lens(model, b, positions=pos, k=pool).top_ids.permute(1, 0, 2, 3).numpy()  # [B, L, P, pool]
        missing = (pos < 0).numpy()[:, None, :].repeat(ids.shape[1], 1)  # [B, L, P]
        for i in range(len(b)):
            kept = _kept(ids[i], text, top_k)  # the same kept tokens for every set of related words
            for label, rel in sets.items():
                out[label][s + i] = _rates_kept(ids[i], kept, rel[s + i], text, top_k)
        for r in out.values():
            r[s:s + len(b)][missing] = np.nan
    main = out.pop(None)
    return EnrichmentRun(main, top_k, pool, out)


# ---------------------------------------------------------------- which sublayers enrich the subject


def sublayer_knockout_topk(model, batch: Batch, spans: torch.Tensor, read_layer: int, window: int,
                           k: int = 50, kinds: Sequence[str] = ("mlp", "attention")) -> tuple[torch.Tensor, list[int]]:
    """Geva et al.'s test of where subject enrichment happens: cancel the updates of the MLP (or
    attention) sublayers, at every position, in a window of ``window`` layers starting at each layer
    before ``read_layer``, and read the top-``k`` tokens of the subject's last position after
    ``read_layer``.

    Every (kind, start) of every prompt is one row of a single batched forward. Returns
    ``(ids [B, 1 + len(kinds) * S, k], starts)``: column 0 is the clean run, then each kind over the
    ``S`` start layers.
    """
    read_layer = check_layer("read_layer", read_layer, model.num_layers)
    check_int("ENRICH_WINDOW", window, 1, model.num_layers)
    bad = [x for x in kinds if x not in ("mlp", "attention")]
    if bad:
        raise ParameterError(f"unknown sublayer kinds {bad}; valid: ['mlp', 'attention']")
    starts = list(range(read_layer))
    R = 1 + len(kinds) * len(starts)
    B = len(batch)
    rep = batch.select([b for b in range(B) for _ in range(R)])
    # cancel[kind][layer, row]: whether that row's sublayer output is zeroed at that layer
    cancel = {x: torch.zeros(model.num_layers, B * R, dtype=torch.bool) for x in ("mlp", "attention")}
    for b in range(B):
        r = 1
        for kind in kinds:
            for s in starts:
                cancel[kind][s:min(s + window, read_layer + 1), b * R + r] = True
                r += 1
    subj_last = (spans[:, 1] - 1).repeat_interleave(R)
    dev = model_device(model)
    cancel = {x: c.to(dev) for x, c in cancel.items()}
    with torch.no_grad(), trace(model, rep, last_only=True):
        for layer in range(read_layer + 1):
            if bool(cancel["attention"][layer].any()):
                a = model.attentions_output[layer]
                a[cancel["attention"][layer]] = 0.0
            if bool(cancel["mlp"][layer].any()):
                m = model.mlps_output[layer]
                m[cancel["mlp"][layer]] = 0.0
        h = model.layers_output[read_layer][torch.arange(B * R), subj_last]
        ids = model.project_on_vocab(h).topk(k, dim=-1).indices.save()
    return ids.cpu().reshape(B, R, k), starts


@dataclasses.dataclass
class SublayerRun:
    """Attributes rate (%) at the subject's last token after ``read_layer`` (:func:`run_sublayer_knockout`):
    ``clean`` ``[F]`` without intervention; ``mlp`` and ``attention`` ``[F, S]`` with that kind of
    update cancelled in the ``window`` layers from each start layer in ``starts`` (``S`` of them)."""

    read_layer: int
    starts: list[int]
    window: int
    clean: np.ndarray
    mlp: np.ndarray
    attention: np.ndarray

    @property
    def n_facts(self) -> int:
        """The number of facts ``F``."""
        return len(self.clean)

    def early_effect(self) -> tuple[float, float, float]:
        """Mean rate (%) without intervention, and with MLP / attention updates cancelled, averaged
        over the windows starting in the first half of the layers before the read-out."""
        half = max(1, len(self.starts) // 2)
        return float(self.clean.mean()), float(self.mlp[:, :half].mean()), float(self.attention[:, :half].mean())

    def early_drops(self, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
        """How far cancelling early updates lowers the rate (percentage points, the windows of
        :meth:`early_effect`), with 95% bootstrap intervals over facts: ``"mlp"``, ``"attention"`` and
        ``"mlp - attention"`` (positive: the MLP updates matter more, as Geva et al. find)."""
        half = max(1, len(self.starts) // 2)
        drops = np.stack([self.clean - self.mlp[:, :half].mean(1), self.clean - self.attention[:, :half].mean(1)], 1)
        return {"mlp": bootstrap_stat(drops[:, 0], np.mean, n_boot, seed),
                "attention": bootstrap_stat(drops[:, 1], np.mean, n_boot, seed),
                "mlp - attention": bootstrap_stat(drops[:, 0] - drops[:, 1], np.mean, n_boot, seed)}


def run_sublayer_knockout(model, facts: Sequence[Fact], descriptions: dict[str, str], depth: float = 0.83,
                          window: int = 5, top_k: int = KEEP, batch_size: int = 8, pool: int = POOL) -> SublayerRun:
    """Geva et al.'s sublayer knockout (:func:`sublayer_knockout_topk`), reading the subject's last
    token after the layer at relative ``depth`` (the paper: layer 40 of GPT-2 XL's 48); the rate keeps
    the first ``top_k`` content tokens of the top ``pool`` (:func:`attributes_rates`)."""
    read_layer = max(1, int(round(depth * (model.num_layers - 1))))
    related = _other_attributes(model, facts, descriptions)
    text = TokenText(model)
    rows, starts = [], []
    for s in range(0, len(facts), batch_size):
        b, spans = _subject_batch(model, facts[s:s + batch_size])
        ids, starts = sublayer_knockout_topk(model, b, spans, read_layer, window, k=min(pool, _vocab_size(model)))
        rows.append(attributes_rates(ids.numpy(), related[s:s + len(b)], text, top_k))
    rows = np.concatenate(rows) * 100
    S = len(starts)
    return SublayerRun(read_layer, starts, window, rows[:, 0], rows[:, 1:1 + S], rows[:, 1 + S:1 + 2 * S])


# ---------------------------------------------------------------- attribute extraction


def extraction_events(model, group: FactGroup, predicted: torch.Tensor, block_subject: bool = True) -> torch.Tensor:
    """The **propagated** variant of the extraction test (the book's earlier measure, not the paper's):
    whether each layer's attention and MLP update at the last position, projected by the unembedding,
    has the predicted token as its top-1, ``[F, V, L, 2]`` booleans, ``V`` = 1 (clean) or 2 (clean, and
    with the last position's attention to the subject blocked at *every* layer, so that a block at one
    layer changes what later layers read), last axis = (attention, MLP). Geva et al.'s measure blocks at
    one layer only: :func:`extraction_facts`.
    """
    F, n = len(group.index), group.length
    R = 2 if block_subject else 1
    keep = torch.ones(F, R, n)
    if block_subject:
        for f in range(F):
            keep[f, 1, key_masks(n, tuple(group.spans[f].tolist()), True)["subject"]] = 0.0
    active = torch.zeros(model.num_layers, F * R, dtype=torch.bool)
    active[:, 1::R] = block_subject

    def read(model, layer):
        attn, mlp = sublayer_updates(model, layer)
        return torch.stack([model.lm_head(attn[:, -1]).argmax(-1), model.lm_head(mlp[:, -1]).argmax(-1)], -1)

    _, tops = last_token_run(model, group, keep.reshape(F * R, n), active, R, read_layer=read)
    tops = torch.stack(tops, 1).reshape(F, R, model.num_layers, 2)  # [F, R, L, 2]
    return tops == predicted.view(F, 1, 1, 1)


def same_layer_events(model, group: FactGroup, predicted: torch.Tensor) -> torch.Tensor:
    """Geva et al.'s extraction test at the last position, from one clean forward: whether the attention
    update, the MLP update, and the attention update recomputed with the last position's weights on the
    subject zeroed **at that layer only** (:func:`lmbook.mechanisms.knockout.same_layer_blocked`),
    projected by the unembedding (no final norm, as Geva et al. project with the embedding matrix), have
    the predicted token as their top-1: ``[F, L, 3]`` booleans (attention, MLP, attention blocked)."""
    block = torch.zeros(len(group.index), group.length, dtype=torch.bool)
    for f in range(len(group.index)):
        block[f] = key_masks(group.length, tuple(group.spans[f].tolist()), True)["subject"]
    w = same_layer_blocked(model, group.batch, block)
    parts = torch.stack([w["attention"], w["mlp"], w["blocked"]], -2)  # [L, F, 3, d]
    L, F, K, d = parts.shape
    top = unembed(model, parts.reshape(-1, d)).argmax(-1).reshape(L, F, K).permute(1, 0, 2)
    return top == predicted.view(F, 1, 1)


def extraction_facts(model, prompts: Sequence[str], subjects: Sequence[str], predicted: torch.Tensor,
                     max_group: int = 16, progress: bool = True, propagated: bool = False) -> torch.Tensor:
    """The extraction tests over many prompts (start token first), grouped by length: ``[N, L, K]``
    booleans, ``K`` = 3 (:func:`same_layer_events`: attention, MLP, attention with the subject blocked at
    that layer), or 5 with ``propagated`` (then also :func:`extraction_events`' attention and MLP updates
    with the subject blocked at every layer)."""
    from tqdm.auto import tqdm

    groups = group_facts(model, prompts, subjects, predicted, max_group)
    out = torch.zeros(len(prompts), model.num_layers, 5 if propagated else 3, dtype=torch.bool)
    for g in tqdm(groups, desc="attribute extraction", disable=not progress):
        out[g.index, :, :3] = same_layer_events(model, g, g.target)
        if propagated:
            out[g.index, :, 3:] = extraction_events(model, g, g.target)[:, 1]
    return out


EXTRACTION_KEYS = {"attention": 0, "mlp": 1, "attention_blocked": 2, "attention_blocked_propagated": 3,
                   "mlp_blocked_propagated": 4}
"""Columns of :attr:`ExtractionRun.events`: clean attention and MLP updates, the attention update with the
subject blocked at the same layer (Geva et al.), and, in the propagated variant only, both updates with the
subject blocked at every layer."""


@dataclasses.dataclass
class ExtractionRun:
    """Extraction events (:func:`run_extraction`): ``events`` ``[F, L, K]`` booleans, columns
    :data:`EXTRACTION_KEYS` (``K`` = 3, or 5 with the propagated variant)."""

    events: np.ndarray

    @property
    def n_facts(self) -> int:
        """The number of facts ``F``."""
        return len(self.events)

    @property
    def keys(self) -> list[str]:
        return [k for k, i in EXTRACTION_KEYS.items() if i < self.events.shape[-1]]

    def any_layer(self, n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float, float]]:
        """Share of facts (%) with an extraction event at any layer, with a 95% bootstrap interval
        over facts: ``{key: (mean, lo, hi)}`` for each of :attr:`keys`."""
        out = {}
        for key in self.keys:
            hit = self.hits(key).astype(float)
            mean, lo, hi = bootstrap_ci(hit, n_boot=n_boot, seed=seed)
            out[key] = (float(mean) * 100, float(lo) * 100, float(hi) * 100)
        return out

    def by_layer(self, key: str) -> np.ndarray:
        """``[F, L]`` booleans: events of ``key`` layer by layer."""
        return self.events[:, :, EXTRACTION_KEYS[key]]

    def hits(self, key: str) -> np.ndarray:
        """``[F]`` booleans: whether a fact has an extraction event of ``key`` (:data:`EXTRACTION_KEYS`) at
        any layer."""
        if key not in self.keys:
            raise ParameterError(f"no extraction events {key!r} in this run; it holds {self.keys}")
        return self.by_layer(key).any(1)

    def difference(self, key: str, other: str, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """Share of facts with an event of ``key`` minus the share with one of ``other`` (the same facts),
        with a 95% bootstrap interval over facts; NaN with fewer than two facts."""
        return bootstrap_stat(self.hits(key).astype(float) - self.hits(other), np.mean, n_boot, seed)


def run_extraction(model, facts: Sequence[Fact], progress: bool = True, propagated: bool = False) -> ExtractionRun:
    """Geva et al.'s attribute extraction for ``facts``, targets their attributes' first tokens; with
    ``propagated`` also the variant that blocks the subject at every layer (:func:`extraction_facts`)."""
    prompts, subjects = _prompts_subjects(facts)
    return ExtractionRun(extraction_facts(model, prompts, subjects, answer_token_ids(model, facts),
                                          progress=progress, propagated=propagated).numpy())


# ---------------------------------------------------------------- side by side with the paper


PAPER_FINDINGS = [
    "Blocking last→subject hurts most in upper-middle layers; last→non-subject (relation) hurts earlier",
    "Attributes rate rises over early-middle layers at the last subject token, far above other positions",
    "Cancelling early MLP updates sharply lowers the subject's attributes rate; early attention much less",
    "Extraction events mostly in attention updates rather than MLP updates",
    "Blocking last→subject attention lowers the attention extraction rate",
    "Causal tracing: early-middle MLPs at the last subject token, late attention at the last token",
]


PAPER_ROWS = ("knockout", "enrichment", "sublayer", "extraction", "blocked", "tracing")
"""Keys of the rows of :data:`PAPER_FINDINGS`, in order (the outcomes of :func:`paper_comparison`)."""

EARLY_MIDDLE = (0.0, 0.5)
"""ROME's MLP band at the last subject token lies in the first half of GPT-2 XL's layers; its late attention
effects at the last token in the second half (relative depths)."""


def _depth(layer: Estimate, n_layers: int) -> Estimate:
    scale = max(1, n_layers - 1)
    return Estimate(layer.value / scale, layer.low / scale, layer.high / scale)


def _both(outcomes: Sequence[str]) -> str:
    """Two :func:`~lmbook.core.claims.against_paper` outcomes as one: as the paper only when both are."""
    if "unlike_paper" in outcomes:
        return "unlike_paper"
    if "no_data" in outcomes:
        return "no_data"
    return "as_paper" if all(o == "as_paper" for o in outcomes) else "indistinguishable"


def paper_comparison(knockout: KnockoutRun, enrichment: EnrichmentRun, sublayer: SublayerRun,
                     extraction: ExtractionRun, tracing=None, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, tuple[str, dict]]:
    """For each row of :data:`PAPER_FINDINGS` (keys :data:`PAPER_ROWS`), ``(outcome, values)``: this run's
    outcome against the paper's finding (``"as_paper"``, ``"unlike_paper"``, ``"indistinguishable"``,
    ``"no_data"``; :func:`lmbook.core.claims.against_paper`) and the estimates it is computed from, each with a
    95% bootstrap interval over facts (facts resampled with ``seed``). ``tracing``: a
    :class:`lmbook.experiments.causal_tracing.CausalTracingRun`, or ``None`` when not run.

    * ``knockout``: the subject dip's layer minus the non-subject dip's is above zero (subject information
      is read later), when both dips lower the probability; ``"no_dip"`` when one of them does not;
    * ``enrichment``: the subject's last token peaks above the last token and the token after the subject;
    * ``sublayer``: cancelling early MLP updates lowers the rate more than cancelling early attention;
      ``"no_drop"`` when neither lowers it;
    * ``extraction``: more facts have an attention extraction event than an MLP one;
    * ``blocked``: blocking the subject lowers the share of facts with an attention event;
    * ``tracing``: the MLP effect at the subject's last token peaks in the first half of the layers and
      the attention effect at the last token in the second half (:data:`EARLY_MIDDLE`).
    """
    L, F = knockout.n_layers, len(knockout.clean)
    out = {}
    dips = knockout.dip_layers(n_boot, seed)
    sub, non = dips["subject"], dips["non-subject"]
    v = dict(n_layers=L, n_facts=F, subject=sub, nonsubject=non, gap=dips["subject - non-subject"],
             subject_depth=_depth(sub, L), nonsubject_depth=_depth(non, L),
             subject_drop=knockout.drop_at("subject", knockout.largest_drop("subject")[1], n_boot, seed),
             nonsubject_drop=knockout.drop_at("non-subject", knockout.largest_drop("non-subject")[1], n_boot, seed))
    o = against_paper(compare(v["gap"], 0), "greater")
    if o != "no_data" and any(compare(v[k], 0) != "less" for k in ("subject_drop", "nonsubject_drop")):
        o = "no_dip"  # a layer of "the largest drop" means nothing for a curve that does not drop
    out["knockout"] = (o, v)

    gaps = [enrichment.peak_gap("subject last", p, n_boot, seed) for p in ("last", "after subject")]
    rel = [compare(g, 0) for g in gaps if not g.missing]
    ours = ("no_data" if not rel else "less" if "less" in rel
            else "greater" if all(r == "greater" for r in rel) else "indistinguishable")
    peaks = {p: enrichment.peak(p)[0] if not np.isnan(enrichment.rates[:, :, POSITIONS.index(p)]).all() else math.nan
             for p in ("subject last", "last", "after subject")}
    out["enrichment"] = (against_paper(ours, "greater"), dict(
        n_facts=len(enrichment.rates), subject_last=peaks["subject last"], last=peaks["last"],
        after=peaks["after subject"], gap_last=gaps[0], gap_after=gaps[1], layer=enrichment.peak("subject last")[1]))

    drops = sublayer.early_drops(n_boot, seed)
    o = against_paper(compare(drops["mlp - attention"], 0), "greater")
    if o != "no_data" and all(compare(drops[k], 0) != "greater" for k in ("mlp", "attention")):
        o = "no_drop"  # neither cancellation lowers the rate: no enrichment to place
    out["sublayer"] = (o, dict(
        n_facts=len(sublayer.clean), read_layer=sublayer.read_layer, clean=float(sublayer.clean.mean()),
        mlp=drops["mlp"], attention=drops["attention"], gap=drops["mlp - attention"]))

    shares = {k: Estimate.share(extraction.hits(k)) for k in ("attention", "mlp", "attention_blocked")}
    n_ext = len(extraction.events)
    out["extraction"] = (against_paper(compare(extraction.difference("attention", "mlp", n_boot, seed), 0), "greater"),
                         dict(n_facts=n_ext, attention=shares["attention"], mlp=shares["mlp"],
                              gap=extraction.difference("attention", "mlp", n_boot, seed)))
    blocked = extraction.difference("attention_blocked", "attention", n_boot, seed)
    out["blocked"] = (against_paper(compare(blocked, 0), "less"), dict(
        n_facts=n_ext, attention=shares["attention"], blocked=shares["attention_blocked"], gap=blocked))

    if tracing is None:
        none = Estimate(math.nan, math.nan, math.nan)
        out["tracing"] = ("no_data", dict(n_facts=0, n_layers=L, mlp_layer=none, mlp_depth=none, attention_layer=none,
                                          attention_depth=none))
    else:
        mlp, att = tracing.peak_layer("mlp", "subject last", n_boot, seed), tracing.peak_layer("attention", "last",
                                                                                                n_boot, seed)
        v = dict(n_facts=len(tracing.p_clean), n_layers=L, mlp_layer=mlp, mlp_depth=_depth(mlp, L),
                 attention_layer=att, attention_depth=_depth(att, L))
        out["tracing"] = (_both([against_paper(within(v["mlp_depth"], *EARLY_MIDDLE), "inside"),
                                 against_paper(within(v["attention_depth"], EARLY_MIDDLE[1], 1.0), "inside")]), v)
    return out


# ---------------------------------------------------------------- the protocol, item by item


PAPER_ITEMS = {
    "start": ("Start token (attention sink) never blocked",
              "not reported: the paper does not discuss a start token or the attention sink"),
    "extraction": ("Extraction with the subject blocked at the same layer",
                   "fewer attention extraction events when the last position cannot read the subject"),
    "window": ("Knockout window at relative depth; order of the dips",
               "9 of GPT-2 XL's 48 layers (0.19 of the depth); the non-subject dip before the subject dip"),
    "tracing": ("Causal tracing with power (ROME)",
                "about 1000 facts x 10 noise samples; MLP at the last subject token early-middle, "
                "attention at the last token late"),
    "rate": ("Attributes rate as the reference computes it",
             "top 500 tokens, first 50 content tokens, divided by 50; related words from Wikipedia paragraphs "
             "(the paper's attributes-rate figure for GPT-2 XL and GPT-J)"),
    "generality": ("Any facts file", "CounterFact"),
}
"""The protocol items of chapter 2's comparison table: ``{key: (item, what the paper reports or does)}``."""


def paper_items(model: str, knockout: KnockoutRun, enrichment: EnrichmentRun, extraction: ExtractionRun,
                facts: Sequence[Fact], n_known: int, sink: dict[str, Estimate] | None = None, sink_model: str = "",
                tracing: str | None = None, short_variant: str | None = None, n_boot: int = 1000,
                seed: int = 0) -> pd.DataFrame:
    """Chapter 2's table of protocol items (:data:`PAPER_ITEMS`): the paper's value or protocol beside this
    run's, each of ours computed (95% bootstrap intervals over facts, Wilson intervals for shares).

    ``sink``: :func:`sink_share` for ``sink_model`` (a model without its own BOS), or None when no model
    run needs a start token; ``tracing``: the causal-tracing row's text (from
    :class:`lmbook.experiments.causal_tracing.CausalTracingRun`), or None when not run; ``short_variant``:
    the label of ``enrichment``'s variant scored with the short descriptions."""
    L, F = knockout.n_layers, len(knockout.clean)
    ours = {}
    if sink is None:
        ours["start"] = f"{model}: the tokenizer's own BOS is position 0 and is never blocked"
    else:
        ours["start"] = (f"{sink_model}: largest last↛subject drop {sink['bare']:.0f}% without a start token, "
                         f"{sink['fixed']:.0f}% with one; share of the old drop that was the sink "
                         f"{sink['share']:.2f} (95% bootstrap intervals over facts)")
    sh = {k: Estimate.share(extraction.hits(k)) for k in ("attention", "attention_blocked")}
    gap = extraction.difference("attention_blocked", "attention", n_boot, seed)
    ours["extraction"] = (f"{model}: attention events in {sh['attention']:.2f} of {len(extraction.events)} facts, "
                          f"{sh['attention_blocked']:.2f} with the subject blocked (difference {gap:.2f})")
    dips = knockout.dip_layers(n_boot, seed)
    ours["window"] = (f"{model}: {knockout.window} of {L} layers ({knockout.window / L:.2f}); subject dip at layer "
                      f"{dips['subject']:.0f}, non-subject at {dips['non-subject']:.0f}, subject minus non-subject "
                      f"{dips['subject - non-subject']:.0f} layers ({F} facts)")
    ours["tracing"] = tracing if tracing else "not run (N_TRACE)"
    peak = enrichment.peak_estimate("subject last", None, n_boot, seed)
    text = f"{model}: peak {peak:.1f}% at the subject's last token with the long descriptions"
    if short_variant is not None and short_variant in enrichment.variants:
        text += f", {enrichment.peak_estimate('subject last', short_variant, n_boot, seed):.1f}% with the short ones"
    ours["rate"] = text + f" ({len(enrichment.rates)} facts)"
    ours["generality"] = (f"{len(facts)} facts, {len({f.relation for f in facts})} relations, "
                          f"{len({f.subject for f in facts})} subjects; {model} knows {n_known}")
    return pd.DataFrame([{"item": item, "paper": paper, "this run": ours[k]}
                         for k, (item, paper) in PAPER_ITEMS.items()])


# ---------------------------------------------------------------- what a lower-precision copy changes

DISSECTION_MEASURES = ("knockout", "enrichment", "sublayer", "extraction")
"""The experiments whose curves :func:`dissection_curves` reads and :func:`dissection_precision`
compares between a lower-precision copy (:func:`lmbook.core.models.load_copy`) and the float32
model. Chapter 2 runs the first three on the copy (``DISSECT_DTYPE``); attribute extraction stays
float32 there, since its events hinge on which single token ranks first."""


def dissection_curves(measure: str, run, n_facts: int | None = None) -> np.ndarray:
    """The fact-averaged curves of one experiment of :data:`DISSECTION_MEASURES` that the chapter
    plots, over its first ``n_facts`` facts (all by default), flattened: the knockout's change (%) of
    every kind by layer, the attributes rate (%) at every position by layer, the sublayer knockout's
    rate (%) without intervention and with MLP or attention updates cancelled, and the share of facts
    (%) with each kind of extraction event by layer."""
    k = n_facts
    with warnings.catch_warnings():  # a position no fact has (NaN everywhere) stays NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return _dissection_curves(measure, run, k)


def _dissection_curves(measure: str, run, k: int | None) -> np.ndarray:
    if measure == "knockout":
        parts = [np.nanmean(run.changes[kind][:k], axis=0) for kind in sorted(run.changes)]
    elif measure == "enrichment":
        parts = [np.nanmean(run.rates[:k], axis=0).ravel() * 100]
    elif measure == "sublayer":
        parts = [np.atleast_1d(np.nanmean(run.clean[:k])), np.nanmean(run.mlp[:k], axis=0),
                 np.nanmean(run.attention[:k], axis=0)]
    elif measure == "extraction":
        parts = [run.events[:k].astype(float).mean(axis=0).ravel() * 100]
    else:
        raise ParameterError(f"unknown measure {measure!r}; valid: {list(DISSECTION_MEASURES)}")
    return np.concatenate([np.asarray(p, dtype=float).ravel() for p in parts])


def dissection_precision(fast: dict, exact: dict) -> dict:
    """How much running chapter 2's dissection on a lower-precision copy changes it: ``fast`` and
    ``exact`` map each measure of :data:`DISSECTION_MEASURES` to a run (the copy's, on all its facts,
    and the float32 model's on the copy's first facts, same order). For each measure: the largest
    absolute difference between the two runs' fact-averaged curves over ``exact``'s facts
    (:func:`dissection_curves`; in the curves' units, percent), the largest absolute value of
    ``exact``'s curves, their ratio, and the number of facts compared."""
    out = {}
    for measure, run in exact.items():
        n = run.n_facts
        a, b = dissection_curves(measure, fast[measure], n), dissection_curves(measure, run)
        both = ~(np.isnan(a) | np.isnan(b))
        diff = float(np.max(np.abs(a[both] - b[both]))) if both.any() else 0.0
        size = float(np.max(np.abs(b[both]))) if both.any() else 0.0
        out[measure] = {"max_difference": diff, "max_value": size, "n_facts": int(n),
                        "ratio": diff / size if size > 0 else (0.0 if diff == 0 else float("inf"))}
    return out
