"""Activation addition: steering a model by adding a contrast vector to its residual stream.

Introduced in chapter 4 ("Steering by activation addition"), after Turner et al. (2023). A
*steering vector* is the difference of the residual streams of a contrast pair of prompts
(``" Love"`` minus ``" Hate"``) after a chosen layer, one vector per token position. Steering adds
``coefficient * vector`` to the residual stream after that layer at the **first positions** of
the user's prompt (position ``i`` of the vector to position ``i`` of the prompt).

Sweeps over layers and coefficients run as **one** batched forward: the prompts are repeated once
per configuration ``(layer, coefficient)`` and each row is steered only by its own configuration.
A coefficient of 0 adds an exact zero, so such a row computes exactly what the unsteered model does
(tested in ``tests/test_steering.py``).

Every text starts with a start token: the tokenizer's beginning-of-sequence token where it adds one,
else the book's one start token (:func:`lmbook.core.tokens.start_token_id`, ``<|endoftext|>`` for
SmolLM2). Turner et al. prepend GPT-2's, so the vector's first position (start minus start, zero)
lands on the attention sink and its content on the first real tokens. Without it the first word
becomes the sink, and a vector added there barely moves the model.

In generation the vector is added in the forward pass over the prompt only: with the key-value
cache the prompt's keys and values, which carry the addition, are reused at every later step. This
is what Turner et al.'s hook computes when it re-runs the whole prompt at every step (their hook
adds to the first positions only, which later steps do not recompute).

Three rules keep the measurement honest (chapter 4, issue 13):

* **The span stops before the predicting token.** The vector is added to at most the first
  ``n_tokens - 1`` positions of a prompt of ``n_tokens`` tokens (:func:`steered_span`), so the
  last token, whose output predicts the next word, is never overwritten: a vector longer than a
  short prompt is *shortened* (its tail positions are dropped for that prompt), never padded into it.
* **The metric does not count the steering words.** :func:`pair_word_stems` and
  :func:`exclude_pair_words` remove the contrast pair's own words and their inflections (words
  sharing a stem: ``" love"``, ``" lovely"``, ``" loved"``) from the word lists a metric counts.
* **A configuration is chosen on some prompts and reported on others.** :func:`split_prompts`
  draws a seeded, disjoint split; :func:`select_then_report` sweeps on the selection prompts, picks
  with :func:`choose_setting` and measures only the chosen configuration (and the unsteered model)
  on the held-out prompts, which the choice never sees.

Layers are labelled as in the rest of the book: "layer ``l``" is the **output of block** ``l``,
which is the residual stream *before* block ``l + 1`` (TransformerLens' ``resid_pre`` of layer
``l + 1``, the name Turner et al. use). Their "layer 6" is our layer 5.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np
import torch

from lmbook.core.claims import bootstrap_stat
from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_float, check_int, check_layers
from lmbook.core.tokens import Batch, decode_tokens, encode, pad_ids, text_ids
from lmbook.mechanisms.generation import generate_ids
from lmbook.mechanisms.readout import final_logits, last_trace

__all__ = [
    "SteeringVector",
    "contrast_vector",
    "steered_target_logprobs",
    "steered_nll",
    "steered_generate",
    "log_odds",
    "word_rate",
    "choose_setting",
    "steered_span",
    "word_stem",
    "pair_word_stems",
    "exclude_pair_words",
    "split_prompts",
    "SentimentMeasure",
    "TopicMeasure",
    "HeldOutChoice",
    "select_then_report",
    "compare_topic_runs",
]


@dataclasses.dataclass
class SteeringVector:
    """Contrast vectors of one prompt pair.

    * ``layers``: the ``L`` layers they were read after
    * ``vectors``: ``[L, n, d]``: residual stream of ``positive`` minus that of ``negative`` after
      each layer, at each of the pair's ``n`` token positions
    * ``positive_tokens`` / ``negative_tokens``: the ``n`` tokens of each prompt (the shorter one
      padded at the end, as in Turner et al.)
    """

    layers: list[int]
    vectors: torch.Tensor
    positive_tokens: list[str]
    negative_tokens: list[str]

    def at(self, layer: int) -> torch.Tensor:
        """The ``[n, d]`` vector read after ``layer``."""
        if layer not in self.layers:
            raise ParameterError(f"no steering vector for layer {layer}; computed for layers {self.layers}")
        return self.vectors[self.layers.index(layer)]

    @property
    def n_positions(self) -> int:
        return self.vectors.shape[1]


def contrast_vector(model, positive: str, negative: str, layers=None, pad: str = " ") -> SteeringVector:
    """Residual stream of ``positive`` minus that of ``negative`` after each of ``layers``.

    Both prompts are tokenised with a start token first (:func:`lmbook.core.tokens.text_ids`); the
    shorter is padded at the end with the tokens of ``pad`` (a space, as in Turner
    et al.), so the two align position by position. Returns a :class:`SteeringVector` with
    ``vectors`` of shape ``[L, n, d]``; one traced forward of two rows.
    """
    for name, s in (("positive", positive), ("negative", negative)):
        if not isinstance(s, str) or not s:
            raise ParameterError(f"the {name} prompt of a contrast pair must be a non-empty string, got {s!r}")
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    tok = model.tokenizer
    ids = [text_ids(tok, s, start=True) for s in (positive, negative)]
    pad_ids = tok(pad, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    n = max(len(i) for i in ids)
    for i in ids:
        while len(i) < n:
            i.append(pad_ids[0])
    input_ids = torch.tensor(ids, dtype=torch.long)
    batch = Batch([positive, negative], input_ids, torch.ones_like(input_ids), torch.full((2,), n - 1), None)
    with torch.no_grad(), last_trace(model, batch):  # no logits needed
        out = list().save()
        for layer in layers:
            h = model.layers_output[layer]
            out.append(h[0] - h[1])
    return SteeringVector(layers, torch.stack(out).float().cpu(), decode_tokens(tok, ids[0]),
                          decode_tokens(tok, ids[1]))


def _check_configs(sv: SteeringVector, configs) -> list[tuple[int, float]]:
    """``configs``: a list of ``(layer, coefficient)``; a zero coefficient needs no vector (any layer)."""
    if not isinstance(configs, (list, tuple)) or not configs:
        raise ParameterError(f"configs must be a non-empty list of (layer, coefficient) pairs, got {configs!r}")
    out = []
    for i, c in enumerate(configs):
        if not (isinstance(c, (list, tuple)) and len(c) == 2):
            raise ParameterError(f"configs[{i}] must be a (layer, coefficient) pair, got {c!r}")
        coeff = check_float(f"configs[{i}] coefficient", c[1])
        layer = c[0]
        if coeff != 0.0 or layer is not None:
            check_int(f"configs[{i}] layer", layer)
        if coeff != 0.0 and layer not in sv.layers:
            raise ParameterError(f"configs[{i}]: layer {layer} has no steering vector; computed for layers {sv.layers}")
        out.append((layer, coeff))
    return out


def steered_span(n_positions: int, n_tokens: int) -> int:
    """How many of a vector's ``n_positions`` are added to a prompt of ``n_tokens`` tokens (start
    token included): all of them if the prompt is longer than the vector, else ``n_tokens - 1``, so
    the span ends strictly before the prompt's last token (the one that predicts the next word)."""
    return max(0, min(int(n_positions), int(n_tokens) - 1))


def _plan(sv: SteeringVector, configs, n_prompts: int, last, rows: range | None = None):
    """Per layer (in order): the rows it steers and what each row adds.

    The repeated batch's rows are ordered ``config * n_prompts + prompt``; ``rows`` (default all)
    is the chunk being run, and the row indices returned are relative to its start. ``last``
    (``[len(rows)]``, or one int for every row) is the index of each row's last token; row ``r``
    gets the vector's first :func:`steered_span` positions, the rest of its delta is an exact zero.
    Returns ``([(layer, rows [R], delta [R, n, d])], n)`` with ``n`` the longest span;
    zero-coefficient rows are left out (they add nothing).
    """
    rows = range(len(configs) * n_prompts) if rows is None else rows
    last = torch.as_tensor(last, dtype=torch.long).reshape(-1).expand(len(rows))
    spans = torch.tensor([steered_span(sv.n_positions, int(x) + 1) for x in last], dtype=torch.long)
    n = int(spans.max()) if len(spans) else 0
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        layer, coeff = configs[r // n_prompts]
        if coeff != 0.0 and n > 0:
            by_layer.setdefault(layer, []).append((r - rows.start, coeff))
    plan = []
    for layer in sorted(by_layer):
        idx = torch.tensor([i for i, _ in by_layer[layer]], dtype=torch.long)
        coeffs = torch.tensor([k for _, k in by_layer[layer]], dtype=torch.float32)
        keep = (torch.arange(n)[None, :] < spans[idx][:, None]).float()  # [R, n]: inside each row's span
        plan.append((layer, idx, coeffs[:, None, None] * keep[..., None] * sv.at(layer)[None, :n]))
    return plan, n


def _add_front(model, plan, n: int) -> None:
    """Inside a trace: add each planned delta to the first ``n`` positions of its rows, layer by layer."""
    for layer, rows, delta in plan:
        h = model.layers_output[layer]
        h[rows.to(h.device), :n] += delta.to(device=h.device, dtype=h.dtype)


def _chunks(n_rows: int, max_rows: int):
    for start in range(0, n_rows, max_rows):
        yield range(start, min(n_rows, start + max_rows))


def steered_target_logprobs(model, prompts: Sequence[str], sv: SteeringVector, configs, targets,
                            max_rows: int = 256) -> torch.Tensor:
    """Next-token log-probabilities of ``targets`` (``[T]`` ids) after each of the ``B`` prompts,
    under each steering configuration. Returns ``[C, B, T]``.

    All ``C * B`` steered runs are batched (``max_rows`` rows per traced forward); the logits are
    computed only at each row's last token. Each prompt gets the vector's first
    :func:`steered_span` positions: the span never reaches the prompt's last token.
    """
    configs = _check_configs(sv, configs)
    targets = torch.as_tensor(targets, dtype=torch.long)
    batch = encode(model, prompts, start=True)
    C, B = len(configs), len(batch)
    rep = batch.select([b for _ in range(C) for b in range(B)])
    out = []
    for rows in _chunks(C * B, max_rows):
        sub = rep.select(list(rows))
        plan, n = _plan(sv, configs, B, sub.last, rows)
        with torch.no_grad(), trace(model, sub, last_only=True):
            _add_front(model, plan, n)
            lp = final_logits(model, sub, last_only=True).float().log_softmax(-1)[:, targets].save()
        out.append(lp)
    return torch.cat(out).reshape(C, B, -1)


def steered_nll(model, texts: Sequence[str], sv: SteeringVector, configs, prefix: str | None = None,
                max_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of each text under each configuration, and the number of
    tokens scored: two ``[C, B]`` tensors; perplexity is ``exp(sum / count)``.

    The vector is added to the first ``n`` positions (``n`` = its length). Without ``prefix`` those
    are the text's own first tokens, and the tokens scored are those from position ``n`` on. With a
    ``prefix`` (a neutral sentence longer than the vector, start token included) each text follows
    the prefix, the vector lands on the prefix before its last token, and every token of the text
    is scored: the steered model reads
    ordinary text after a steered context, and no token of the text is overwritten by the vector.
    Logits are computed only at the positions that predict a scored token, for up to ``max_tokens``
    such positions per traced forward.
    """
    configs = _check_configs(sv, configs)
    if prefix is None:
        batch = encode(model, texts, start=True)
        first_scored = [sv.n_positions] * len(batch)
    else:
        if not isinstance(prefix, str) or not prefix:
            raise ParameterError(f"prefix must be a non-empty string or None, got {prefix!r}")
        tok = model.tokenizer
        head = text_ids(tok, prefix, start=True)
        if len(head) <= sv.n_positions:
            raise ParameterError(f"the prefix {prefix!r} has {len(head)} tokens; the steering vector covers "
                                 f"{sv.n_positions} positions, so the prefix needs more than that (the span "
                                 f"must end before the prefix's last token)")
        ids = [head + tok(" " + t, add_special_tokens=False)["input_ids"] for t in texts]
        batch = pad_ids(tok, texts, ids)
        first_scored = [len(head)] * len(batch)
    C, B = len(configs), len(batch)
    width = batch.input_ids.shape[1]
    for b in range(B):
        if int(batch.last[b]) < first_scored[b]:
            raise ParameterError(f"text {b} has no token after the steered span ({sv.n_positions} positions) to score")
    rep = batch.select([b for _ in range(C) for b in range(B)])
    # logits only where a scored token is predicted: positions first - 1 .. width - 2 (the same for all rows,
    # since every row's scored span starts at the same position)
    first = min(first_scored)
    keep = torch.arange(first - 1, width - 1)
    max_rows = max(1, max_tokens // len(keep))
    sums, counts = [], []
    for rows in _chunks(C * B, max_rows):
        sub = rep.select(list(rows))
        plan, n = _plan(sv, configs, B, sub.input_ids.shape[1], rows)  # every row is longer than the span
        k = keep[keep < sub.input_ids.shape[1] - 1]
        targets = sub.input_ids[:, k + 1]
        target_mask = sub.attention_mask[:, k + 1].clone()
        for i, r in enumerate(rows):
            target_mask[i, : first_scored[r % B] - first] = 0
        with torch.no_grad(), trace(model, sub, logits_to_keep=k):
            _add_front(model, plan, n)
            lp = model.logits.float().log_softmax(-1)
            nll = (-lp.gather(-1, targets[..., None].to(lp.device))[..., 0] * target_mask.to(lp.device)).sum(-1).save()
        sums.append(nll.cpu())
        counts.append(target_mask.sum(-1))
    return torch.cat(sums).reshape(C, B), torch.cat(counts).reshape(C, B)


def steered_generate(
    model,
    prompt: str,
    sv: SteeringVector,
    configs,
    max_new_tokens: int = 40,
    sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.3,
    seed: int = 0,
    n_samples: int = 1,
) -> list[str]:
    """Continue ``prompt`` ``n_samples`` times under each configuration, all ``C * n_samples`` runs
    as one batched generation (rows ordered ``config * n_samples + sample``).

    The steering vector is added in the pass over the prompt (see the module docstring), on its
    first :func:`steered_span` positions: never on the prompt's last token. With ``sample=True``
    tokens are drawn with ``temperature`` and nucleus ``top_p`` after seeding torch with ``seed``;
    with ``sample=False`` decoding is greedy. Returns ``C * n_samples`` continuations (the prompt not
    included; special tokens dropped).
    """
    configs = _check_configs(sv, configs)
    check_int("max_new_tokens", max_new_tokens, 1, 2048)
    check_int("n_samples", n_samples, 1, 10_000)
    if not isinstance(prompt, str) or not prompt:
        raise ParameterError(f"prompt must be a non-empty string, got {prompt!r}")
    tok = model.tokenizer
    rows = [c for c in configs for _ in range(n_samples)]
    ids = torch.tensor([text_ids(tok, prompt, start=True)] * len(rows), dtype=torch.long)
    last = torch.full((len(rows),), ids.shape[1] - 1)
    batch = Batch([prompt] * len(rows), ids, torch.ones_like(ids), last, None)
    plan, n = _plan(sv, rows, 1, ids.shape[1] - 1)
    out = generate_ids(model, batch, max_new_tokens, edit=lambda m: _add_front(m, plan, n), sample=sample,
                       top_p=top_p, temperature=temperature, seed=seed)
    return tok.batch_decode(out, skip_special_tokens=True)


def log_odds(logprobs: torch.Tensor, positive: Sequence[int], negative: Sequence[int]) -> torch.Tensor:
    """``log P(positive set) - log P(negative set)`` over the last axis of ``logprobs`` (``[..., T]``
    indexed by target position); ``positive`` / ``negative`` are indices into that axis."""
    pos = logprobs[..., list(positive)].logsumexp(-1)
    neg = logprobs[..., list(negative)].logsumexp(-1)
    return pos - neg


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def word_rate(texts: Sequence[str], words) -> tuple[float, list[int], list[int]]:
    """How often the words of ``words`` occur in ``texts`` (lower-cased, whole words only).

    Returns ``(hits per word over all texts, hits per text, words per text)``; the rate is 0 for
    texts with no words at all.
    """
    vocab = {w.strip().lower() for w in words}
    hits, totals = [], []
    for t in texts:
        ws = _WORD.findall(t.lower())
        hits.append(sum(w in vocab for w in ws))
        totals.append(len(ws))
    return (sum(hits) / sum(totals) if sum(totals) else 0.0), hits, totals


def choose_setting(effect, ratio, layers, coeffs, max_ratio: float) -> dict:
    """The (layer, coefficient) with the largest ``effect`` among those whose perplexity ``ratio``
    is within ``max_ratio``; if none is, the largest effect at the smallest coefficient.

    ``effect``/``ratio``: ``[len(layers), len(coeffs)]``. Returns ``{"layer", "coefficient",
    "effect", "perplexity ratio", "within budget"}`` (chapter 4's choice of a setting)."""
    effect, ratio = np.asarray(effect, dtype=float), np.asarray(ratio, dtype=float)
    if effect.shape != ratio.shape or effect.shape != (len(layers), len(coeffs)):
        raise ParameterError(f"effect and ratio must be [{len(layers)}, {len(coeffs)}], got "
                             f"{effect.shape} and {ratio.shape}")
    ok = ratio <= max_ratio
    if not ok.any():
        ok = np.zeros_like(ok)
        ok[:, 0] = True
    i, k = np.unravel_index(np.where(ok, effect, -np.inf).argmax(), effect.shape)
    return {"layer": int(layers[i]), "coefficient": float(coeffs[k]), "effect": float(effect[i, k]),
            "perplexity ratio": float(ratio[i, k]), "within budget": bool(ratio[i, k] <= max_ratio)}


_SUFFIXES = ("ingly", "edly", "fully", "ness", "ful", "ing", "ly", "ed", "er", "es", "s", "e", "d", "y")


def word_stem(word: str, min_length: int = 3) -> str:
    """A crude stem of one word: lower-cased, then common English endings stripped (longest first,
    repeatedly) while at least ``min_length`` letters remain. ``"love"``, ``"lovely"``, ``"loved"``,
    ``"loving"`` and ``"lover"`` all give ``"lov"``; ``"hate"``, ``"hated"`` and ``"hateful"`` give
    ``"hat"``. Enough to find a contrast pair's inflections in a short word list, not a linguist's stemmer."""
    w = word.strip().lower()
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if w.endswith(suffix) and len(w) - len(suffix) >= min_length:
                w = w[: -len(suffix)]
                changed = True
                break
    return w


def pair_word_stems(pair: Sequence[str]) -> set[str]:
    """The stems (:func:`word_stem`) of every word in the prompts of a contrast pair."""
    return {word_stem(w) for text in pair for w in _WORD.findall(text.lower())}


def exclude_pair_words(words: Sequence[str], pair: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a word list into ``(kept, removed)``: removed are the words that share a stem with a
    word of the contrast ``pair`` (the pair's own words and their inflections), which a metric of
    the steering effect should not count, since the vector may simply prime them. Order is kept."""
    stems = pair_word_stems(pair)
    kept, removed = [], []
    for w in words:
        (removed if word_stem(w) in stems else kept).append(w)
    return kept, removed


@dataclasses.dataclass
class PromptSplit:
    """A seeded split of prompts into a selection set (choose a configuration) and a disjoint held-out set
    (report its effect)."""

    select: list[str]
    heldout: list[str]


def split_prompts(prompts: Sequence[str], heldout_fraction: float, seed: int, name: str = "prompts") -> PromptSplit:
    """Shuffle ``prompts`` with ``seed`` and hold out ``round(heldout_fraction * n)`` of them (at least
    one, and at least one left to select on). Duplicate prompts are refused, since one string on both
    sides would leak the held-out set into the choice. Each side keeps the list's order."""
    prompts = list(prompts)
    check_float("heldout_fraction", heldout_fraction, 0.0, 1.0)
    if len(prompts) < 2:
        raise ParameterError(f"{name} needs at least two prompts to split into selection and held-out sets, "
                             f"got {len(prompts)}")
    dup = sorted({p for p in prompts if prompts.count(p) > 1})
    if dup:
        raise ParameterError(f"{name} holds duplicate prompts {dup}; a split must not put one prompt on both sides")
    n_held = min(len(prompts) - 1, max(1, round(heldout_fraction * len(prompts))))
    order = np.random.default_rng(seed).permutation(len(prompts))
    held = set(order[:n_held].tolist())
    return PromptSplit([p for i, p in enumerate(prompts) if i not in held],
                       [p for i, p in enumerate(prompts) if i in held])


UNSTEERED = (None, 0.0)


@dataclasses.dataclass
class SentimentMeasure:
    """Chapter 4's sentiment measure: the change in next-token log-odds of positive over negative
    words, from the unsteered model's, per prompt.

    ``targets``: ``[T]`` token ids; ``variants``: ``{name: (positive indices, negative indices)}`` into
    ``targets`` (e.g. the full lists and the lists without the pair's words); the first variant is the
    one a choice maximises. Calling it on ``(prompts, configs)``, with ``configs[0]`` unsteered, runs one
    batched forward and returns ``{name: [C, P]}``."""

    model: object
    sv: SteeringVector
    targets: torch.Tensor
    variants: dict

    def __call__(self, prompts: Sequence[str], configs) -> dict[str, np.ndarray]:
        lp = steered_target_logprobs(self.model, prompts, self.sv, configs, self.targets)
        out = {}
        for name, (pos, neg) in self.variants.items():
            odds = log_odds(lp, pos, neg)
            out[name] = (odds - odds[0]).numpy()
        return out

    def effect(self, out: dict) -> np.ndarray:
        """``[C]``: the mean change over prompts of the first variant."""
        return out[next(iter(self.variants))].mean(-1)


@dataclasses.dataclass
class TopicMeasure:
    """Chapter 4's topic measure: whole-word hits of a word list in ``n_samples`` sampled continuations
    per prompt and configuration (one batched generation per prompt, the samples as rows, seeded with
    ``seed`` plus the prompt's index).

    ``word_lists``: ``{name: [word, ...]}``; the first is the one a choice maximises. Calling it on
    ``(prompts, configs)`` returns ``{"hits/<name>": [C, P], "words": [C, P], "texts": [P][C][S]}``,
    summed over the samples: a rate is a ratio of sums over prompts
    (:func:`lmbook.core.stats.ratio_bootstrap` resamples the prompts)."""

    model: object
    sv: SteeringVector
    word_lists: dict
    n_samples: int = 5
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 0.3
    seed: int = 0

    def __call__(self, prompts: Sequence[str], configs) -> dict:
        C, P, S = len(configs), len(prompts), self.n_samples
        out = {f"hits/{k}": np.zeros((C, P)) for k in self.word_lists}
        out["words"], out["texts"] = np.zeros((C, P)), []
        for j, prompt in enumerate(prompts):
            gens = steered_generate(self.model, prompt, self.sv, configs, max_new_tokens=self.max_new_tokens,
                                    temperature=self.temperature, top_p=self.top_p, seed=self.seed + j,
                                    n_samples=S)
            for name, words in self.word_lists.items():
                _, hits, totals = word_rate(gens, words)
                out[f"hits/{name}"][:, j] = np.reshape(hits, (C, S)).sum(1)
            out["words"][:, j] = np.reshape(totals, (C, S)).sum(1)
            out["texts"].append([gens[c * S:(c + 1) * S] for c in range(C)])
        return out

    def effect(self, out: dict) -> np.ndarray:
        """``[C]``: hits of the first word list per word generated, over all prompts."""
        hits = out[f"hits/{next(iter(self.word_lists))}"]
        return hits.sum(-1) / np.maximum(out["words"].sum(-1), 1)


@dataclasses.dataclass
class HeldOutChoice:
    """What :func:`select_then_report` found.

    * ``select`` / ``heldout``: the measure's output on each prompt set; on the selection prompts
      for ``configs`` (``[unsteered] + grid + extra``), on the held-out prompts for
      ``[unsteered, chosen]`` only
    * ``grid_effect``: ``[L, K]`` the selection prompts' effect of each grid configuration
    * ``choice``: :func:`choose_setting`'s dict; ``index``: the chosen configuration's row in ``configs``
    """

    split: PromptSplit
    configs: list
    select: dict
    grid_effect: np.ndarray
    choice: dict
    index: int
    heldout: dict


def select_then_report(measure, split: PromptSplit, layers, coeffs, ratio, max_ratio: float,
                       extra_configs=()) -> HeldOutChoice:
    """Choose a configuration on ``split.select`` and measure it on ``split.heldout``.

    ``measure(prompts, configs)`` (a :class:`SentimentMeasure` or :class:`TopicMeasure`) runs on the
    selection prompts under the unsteered model, every ``(layer, coefficient)`` of the grid and
    ``extra_configs``; :func:`choose_setting` picks from the grid by ``measure.effect`` within the
    perplexity ``ratio`` budget; then ``measure`` runs on the held-out prompts under the unsteered
    model and the chosen configuration only. The held-out prompts never reach the selection, and
    the selection prompts never reach the report (tested)."""
    overlap = set(split.select) & set(split.heldout)
    if overlap:
        raise ParameterError(f"selection and held-out prompts overlap: {sorted(overlap)}")
    if not split.select or not split.heldout:
        raise ParameterError("both the selection and the held-out set need at least one prompt")
    grid = [(int(layer), float(c)) for layer in layers for c in coeffs]
    configs = [UNSTEERED] + grid + list(extra_configs)
    select = measure(list(split.select), configs)
    grid_effect = np.asarray(measure.effect(select))[1:1 + len(grid)].reshape(len(layers), len(coeffs))
    choice = choose_setting(grid_effect, ratio, layers, coeffs, max_ratio)
    chosen = (choice["layer"], choice["coefficient"])
    heldout = measure(list(split.heldout), [UNSTEERED, chosen])
    return HeldOutChoice(split, configs, select, grid_effect, choice, 1 + grid.index(chosen), heldout)


def compare_topic_runs(copy: dict, exact: dict, name: str = "kept", seed: int = 0) -> dict:
    """Two :class:`TopicMeasure` outputs for the same prompts, configurations and seeds, set side by
    side, paired over prompts (chapter 4: the generations of a bfloat16 copy against the float32
    model's; issue 16).

    Per configuration row ``c`` of the outputs (``[C, P]`` counts): the rate of the word list
    ``name`` in each (``rate_copy`` / ``rate_exact``, ``[C]``), and ``difference``: ``[C]`` rows of
    ``[copy - exact, low, high]``, the 95% interval from resampling the prompts, the same prompts for
    both runs (:func:`lmbook.core.claims.bootstrap_stat`; NaN with fewer than two prompts). Also
    ``identical``, how many of the ``n_texts`` continuations are the same text in both runs (a
    sampled continuation that differs in one token is a different sample from there on)."""
    key = f"hits/{name}"
    for k in (key, "words"):
        if k not in copy or k not in exact:
            raise ParameterError(f"both outputs need {k!r} (TopicMeasure outputs); got {sorted(copy)} and "
                                 f"{sorted(exact)}")
    hc, wc = np.asarray(copy[key], dtype=float), np.asarray(copy["words"], dtype=float)
    he, we = np.asarray(exact[key], dtype=float), np.asarray(exact["words"], dtype=float)
    if not (hc.shape == wc.shape == he.shape == we.shape) or hc.ndim != 2:
        raise ParameterError(f"the two outputs must hold [configs, prompts] counts of one shape, got {hc.shape} "
                             f"and {he.shape}")
    tc = [t for prompt in copy["texts"] for row in prompt for t in row]
    te = [t for prompt in exact["texts"] for row in prompt for t in row]
    if len(tc) != len(te):
        raise ParameterError(f"the two outputs hold {len(tc)} and {len(te)} continuations; compare runs of the "
                             f"same prompts, configurations and samples")

    def rate(h, w):
        return h.sum(-1) / np.maximum(w.sum(-1), 1)

    diffs = []
    for c in range(hc.shape[0]):
        units = np.stack([hc[c], wc[c], he[c], we[c]], axis=1)  # [P, 4]: one row per prompt
        e = bootstrap_stat(units, lambda x: rate(x[:, 0], x[:, 1]) - rate(x[:, 2], x[:, 3]), seed=seed)
        diffs.append([e.value, e.low, e.high] if not e.missing
                     else [float(rate(hc[c], wc[c]) - rate(he[c], we[c])), np.nan, np.nan])
    return {"rate_copy": rate(hc, wc), "rate_exact": rate(he, we), "difference": np.asarray(diffs),
            "identical": sum(a == b for a, b in zip(tc, te)), "n_texts": len(tc)}
