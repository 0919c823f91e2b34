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
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import torch

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


def _plan(sv: SteeringVector, configs, n_prompts: int, width: int, rows: range | None = None):
    """Per layer (in order): the rows it steers and what each row adds.

    The repeated batch's rows are ordered ``config * n_prompts + prompt``; ``rows`` (default all)
    is the chunk being run, and the row indices returned are relative to its start. Returns
    ``([(layer, rows [R], delta [R, n, d])], n)`` with ``n = min(vector length, width)``;
    zero-coefficient rows are left out (they add nothing).
    """
    rows = range(len(configs) * n_prompts) if rows is None else rows
    n = min(sv.n_positions, width)
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        layer, coeff = configs[r // n_prompts]
        if coeff != 0.0:
            by_layer.setdefault(layer, []).append((r - rows.start, coeff))
    plan = []
    for layer in sorted(by_layer):
        idx = torch.tensor([i for i, _ in by_layer[layer]], dtype=torch.long)
        coeffs = torch.tensor([k for _, k in by_layer[layer]], dtype=torch.float32)
        plan.append((layer, idx, coeffs[:, None, None] * sv.at(layer)[None, :n]))
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
    computed only at each row's last token.
    """
    configs = _check_configs(sv, configs)
    targets = torch.as_tensor(targets, dtype=torch.long)
    batch = encode(model, prompts, start=True)
    C, B = len(configs), len(batch)
    rep = batch.select([b for _ in range(C) for b in range(B)])
    out = []
    for rows in _chunks(C * B, max_rows):
        sub = rep.select(list(rows))
        plan, n = _plan(sv, configs, B, sub.input_ids.shape[1], rows)
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
    ``prefix`` (a neutral sentence of at least ``n - 1`` tokens, say) each text follows the prefix,
    the vector lands on the prefix, and every token of the text is scored: the steered model reads
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
        if len(head) < sv.n_positions:
            raise ParameterError(f"the prefix {prefix!r} has {len(head)} tokens; the steering vector covers "
                                 f"{sv.n_positions} positions, so the prefix needs at least that many")
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
        plan, n = _plan(sv, configs, B, sub.input_ids.shape[1], rows)
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
) -> list[str]:
    """Continue ``prompt`` once under each configuration, all ``C`` runs as one batched generation.

    The steering vector is added in the pass over the prompt (see the module docstring). With
    ``sample=True`` tokens are drawn with ``temperature`` and nucleus ``top_p`` after seeding
    torch with ``seed``; with ``sample=False`` decoding is greedy. Returns ``C`` continuations
    (the prompt not included; special tokens dropped).
    """
    configs = _check_configs(sv, configs)
    check_int("max_new_tokens", max_new_tokens, 1, 2048)
    if not isinstance(prompt, str) or not prompt:
        raise ParameterError(f"prompt must be a non-empty string, got {prompt!r}")
    tok = model.tokenizer
    ids = torch.tensor([text_ids(tok, prompt, start=True)] * len(configs), dtype=torch.long)
    last = torch.full((len(configs),), ids.shape[1] - 1)
    batch = Batch([prompt] * len(configs), ids, torch.ones_like(ids), last, None)
    plan, n = _plan(sv, configs, 1, ids.shape[1])
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
