"""Attention knockout: stop the last position from reading chosen positions in chosen layers.

Introduced in chapter 2 ("Dissecting factual recall", after Geva et al. 2023). Blocking an
attention edge means zeroing its probability and renormalising the row, which is the same as
setting its score to -inf before the softmax; we edit ``model.attention_probabilities[L]``.

**Why a sweep is cheap.** A knockout from the last position changes nothing at the earlier
positions: their hidden states, keys and values are those of the clean run. So the prompt minus
its last token is run once (keys and values cached), and every intervention is one row of a
batch that feeds only the last token against that cache. All windows and all knockout kinds for a
group of facts are one traced forward of one token per row. ``knockout_sweep_looped`` does the
same sweep the plain way (one full forward per intervention); the tests and ``bench/knockout.py``
check that both agree.

The knockouts name positions relative to the subject (:func:`key_masks`); :func:`position_index`
names the four positions that chapter 2's enrichment and causal-tracing experiments read or restore.

**The start token.** Prompts are encoded with :func:`lmbook.core.tokens.encode` ``(start=True)`` by
default, so position 0 is a start token (the tokenizer's BOS, or the book's start token where the
tokenizer adds none) and never a word of the prompt. That position is the attention sink: no
knockout ever blocks it (:func:`key_masks`). ``start=False`` encodes prompts as the tokenizer alone
would (chapter 2 shows what that changes for a model without a BOS token).

**Blocking at one layer only.** :func:`same_layer_blocked` recomputes, from one clean run, what the
attention of a layer writes at the last position when that position's attention weights on chosen
positions are zeroed (Geva et al.'s attribute extraction with the subject blocked): nothing
propagates to later layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int
from lmbook.core.tokens import Batch, encode, start_token_id, token_span
from lmbook.mechanisms.interventions import last_token_inputs, prefix_cache

__all__ = ["KINDS", "POSITIONS", "FactGroup", "group_facts", "layer_windows", "relative_window", "key_masks",
           "position_index", "knockout_sweep", "knockout_sweep_looped", "sweep_facts", "last_token_run",
           "same_layer_blocked", "WINDOW_FRACTION"]

WINDOW_FRACTION = 0.19
"""Geva et al.'s knockout window as a share of the depth: 9 of GPT-2 XL's 48 layers."""

KINDS = ("subject", "non-subject", "last")
POSITIONS = ("subject first", "subject last", "after subject", "last")


def position_index(batch: Batch, spans: torch.Tensor) -> torch.Tensor:
    """Token index of each named position (:data:`POSITIONS`) for each row: ``[B, 4]``, given the
    subjects' token spans ``[B, 2]`` (``[start, end)``). ``after subject`` is the first token after
    the subject (``-1`` when that is the last token). Chapter 2 reads these positions through the
    vocabulary (enrichment) and restores them (causal tracing)."""
    s, e = spans[:, 0], spans[:, 1]
    after = torch.where(e < batch.last, e, torch.full_like(e, -1))
    return torch.stack([s, e - 1, after, batch.last], dim=1)


@dataclasses.dataclass
class FactGroup:
    """Prompts of one token length (no padding). ``index``: positions in the caller's list;
    ``spans``: ``[F, 2]`` subject token span ``[start, end)``; ``target``: ``[F]`` token ids."""

    index: list[int]
    batch: Batch
    spans: torch.Tensor
    target: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.batch.input_ids.shape[1])


def group_facts(model, prompts: Sequence[str], subjects: Sequence[str], targets: torch.Tensor,
                max_group: int = 32, start: bool = True) -> list[FactGroup]:
    """Encode prompts (with the start token first unless ``start=False``, see the module's note),
    find each subject's token span, and group prompts of equal token length (at most ``max_group``
    per group) so that each group needs no padding."""
    if not (len(prompts) == len(subjects) == len(targets)):
        raise ParameterError("prompts, subjects and targets must have the same length")
    check_int("max_group", max_group, 1)
    enc = encode(model, list(prompts), start=start)
    spans = torch.tensor([token_span(enc, i, s) for i, s in enumerate(subjects)])
    lengths = (enc.last + 1).tolist()
    groups = []
    for n in sorted(set(lengths)):
        idx = [i for i, length in enumerate(lengths) if length == n]
        for s in range(0, len(idx), max_group):
            part = idx[s:s + max_group]
            groups.append(FactGroup(part, enc.select(part), spans[part], torch.as_tensor(targets)[part]))
    return groups


def layer_windows(n_layers: int, size: int, name: str = "size") -> list[list[int]]:
    """For each layer ``l``, the window of ``size`` consecutive layers centred on it (clipped at
    the ends): ``l - size // 2 .. l + (size - 1) // 2``."""
    check_int(name, size, 1, n_layers)
    return [list(range(max(0, c - size // 2), min(n_layers, c + (size - 1) // 2 + 1))) for c in range(n_layers)]


def relative_window(n_layers: int, fraction: float = WINDOW_FRACTION) -> int:
    """The knockout window at the paper's relative depth: the odd number of layers nearest to
    ``fraction * n_layers``, at least 3 (at most ``n_layers``). GPT-2 XL's 48 layers give the
    paper's 9."""
    check_int("n_layers", n_layers, 1)
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ParameterError(f"WINDOW_FRACTION={fraction!r} is out of range; valid: 0 < WINDOW_FRACTION <= 1")
    odd = 2 * int(math.floor((fraction * n_layers - 1) / 2 + 0.5)) + 1
    return max(1, min(n_layers, max(3, odd)))


def key_masks(length: int, span: tuple[int, int], has_bos: bool) -> dict[str, torch.Tensor]:
    """Positions the last token may no longer read, per knockout kind: ``{kind: bool [length]}``.

    * ``subject``: the subject's tokens;
    * ``non-subject``: every other token except the last one and, where ``has_bos`` (the prompt
      begins with a start token), the first token (blocking that attention sink breaks any model,
      whatever the fact);
    * ``last``: the last token itself.

    No kind ever blocks position 0 when ``has_bos``, not even a subject span that covers it.
    """
    s, e = span
    subj = torch.zeros(length, dtype=torch.bool)
    subj[s:e] = True
    if has_bos:
        subj[0] = False
    last = torch.zeros(length, dtype=torch.bool)
    last[-1] = True
    other = ~subj & ~last
    other[s:e] = False
    if has_bos:
        other[0] = False
    return {"subject": subj, "non-subject": other, "last": last}


def _starts_with_start_token(model, batch: Batch) -> bool:
    """Whether every row begins with the start token (:func:`lmbook.core.tokens.start_token_id`:
    the tokenizer's own BOS where it adds one, else the token ``encode(..., start=True)`` puts first),
    the attention sink that knockouts never block."""
    sid = start_token_id(model)
    return sid is None or bool((batch.input_ids[:, 0] == sid).all())


def _plan(model, group: FactGroup, kinds: Sequence[str], windows: Sequence[Sequence[int]]):
    """Rows of the sweep for each fact: row 0 clean, then one row per (kind, window).

    Returns ``keep`` ``[F, 1 + K*W, n]`` (1 = the last token may read that position) and
    ``active`` ``[n_layers, 1 + K*W]`` (whether that row is knocked out at that layer)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ParameterError(f"unknown knockout kinds {bad}; valid: {list(KINDS)}")
    n, F = group.length, len(group.index)
    bos = _starts_with_start_token(model, group.batch)
    R = 1 + len(kinds) * len(windows)
    keep = torch.ones(F, R, n)
    active = torch.zeros(model.num_layers, R, dtype=torch.bool)
    for f in range(F):
        masks = key_masks(n, tuple(group.spans[f].tolist()), bos)
        r = 1
        for kind in kinds:
            for win in windows:
                keep[f, r, masks[kind]] = 0.0
                active[list(win), r] = True
                r += 1
    return keep, active


def last_token_run(model, group: FactGroup, keep: torch.Tensor | None, active: torch.Tensor | None,
                   repeats: int, read_layer=None):
    """One traced forward of the last token of every prompt, ``repeats`` rows per fact, against the
    cached prefix; rows with ``active[L]`` set are knocked out at layer ``L`` by ``keep``.

    ``keep``: ``[F * repeats, n]``; ``active``: ``[n_layers, F * repeats]``; both ``None`` for a
    plain run. ``read_layer(model, layer)``, if given, is called inside the trace at every layer,
    after that layer's knockout, to read what the layer computes; its values are returned as a list.
    Returns ``(next-token probabilities [F * repeats, vocab], list of read_layer's values)``.
    """
    # the prompts minus their last token run once; each row feeds only its last token on top (or, on
    # NDIF, which cannot take a cache computed here, the whole prompt, edited at its last row)
    lb, cache = prefix_cache(model, group.batch)
    inputs = last_token_inputs(model, lb, cache, repeats, order="row")
    with torch.no_grad(), trace(model, inputs, use_cache=cache is not None, logits_to_keep=1):
        extra = list().save()
        for layer in range(model.num_layers):
            if keep is not None and bool(active[layer].any()):
                k = torch.where(active[layer][:, None], keep, torch.ones_like(keep))  # [rows, n]
                p = model.attention_probabilities[layer]  # [rows, heads, 1 or n, n], on that layer's device
                q = p[:, :, -1] * k[:, None, :].to(device=p.device, dtype=p.dtype)
                p[:, :, -1] = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
            if read_layer is not None:
                extra.append(read_layer(model, layer))
        probs = model.logits[:, -1].float().softmax(-1).save()
    return probs.cpu(), [x.cpu() for x in extra]


def knockout_sweep(model, group: FactGroup, kinds: Sequence[str] = KINDS,
                   windows: Sequence[Sequence[int]] | None = None, window: int = 9) -> torch.Tensor:
    """Probability of each fact's target after every (kind, window) knockout, in one forward.

    Returns ``[F, 1 + len(kinds) * len(windows)]``: column 0 is the clean run, then the kinds in
    order, each over the windows in order (default: a ``window``-layer window around every layer).
    """
    if windows is None:
        windows = layer_windows(model.num_layers, window, "window")
    keep, active = _plan(model, group, kinds, windows)
    F, R, n = keep.shape
    probs, _ = last_token_run(model, group, keep.reshape(F * R, n), active.repeat(1, F), R)
    return probs.reshape(F, R, -1)[torch.arange(F)[:, None], torch.arange(R)[None], group.target[:, None]]


def knockout_sweep_looped(model, group: FactGroup, kinds: Sequence[str] = KINDS,
                          windows: Sequence[Sequence[int]] | None = None, window: int = 9) -> torch.Tensor:
    """The same sweep as :func:`knockout_sweep`, one full forward per fact and intervention (the
    reference implementation the batched one is tested and benchmarked against)."""
    if windows is None:
        windows = layer_windows(model.num_layers, window, "window")
    keep, active = _plan(model, group, kinds, windows)
    F, R, _ = keep.shape
    out = torch.empty(F, R)
    for f in range(F):
        ids = group.batch.input_ids[f:f + 1]
        for r in range(R):
            with torch.no_grad(), trace(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
                for layer in range(model.num_layers):
                    if not bool(active[layer, r]):
                        continue
                    p = model.attention_probabilities[layer]  # [1, heads, n, n], on that layer's device
                    q = p[:, :, -1] * keep[f, r][None, None, :].to(device=p.device, dtype=p.dtype)
                    p[:, :, -1] = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
                pr = model.logits[0, -1].float().softmax(-1)[int(group.target[f])].save()
            out[f, r] = pr.cpu()
    return out


def sweep_facts(model, prompts: Sequence[str], subjects: Sequence[str], targets: torch.Tensor,
                kinds: Sequence[str] = KINDS, window: int = 9, max_group: int = 16,
                progress: bool = True, start: bool = True) -> torch.Tensor:
    """:func:`knockout_sweep` over many prompts, grouped by token length, with a progress bar.
    Returns ``[N, 1 + len(kinds) * n_layers]`` target probabilities in the order of ``prompts``.
    ``start``: encode with the start token first (see the module's note)."""
    from tqdm.auto import tqdm

    windows = layer_windows(model.num_layers, window, "window")
    groups = group_facts(model, prompts, subjects, targets, max_group, start=start)
    out = torch.empty(len(prompts), 1 + len(kinds) * len(windows))
    for g in tqdm(groups, desc="attention knockout", disable=not progress):
        out[g.index] = knockout_sweep(model, g, kinds, windows)
    return out


def _values(model, layer: int):
    """Inside a trace: the attention's value vectors at ``layer``, ``[B, seq, kv_heads * head_dim]``
    (``v_proj``'s output, or the value third of GPT-2's fused ``c_attn``)."""
    attn = model.attentions[layer]
    mod = attn._module
    if getattr(mod, "v_proj", None) is not None:
        return attn.v_proj.output
    if getattr(mod, "c_attn", None) is not None:
        out = attn.c_attn.output
        d = out.shape[-1] // 3
        return out[..., 2 * d:]
    raise ParameterError(f"the attention block {type(mod).__name__} has neither v_proj nor c_attn; "
                         "same_layer_blocked needs its value vectors")


def same_layer_blocked(model, batch: Batch, block: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each layer's attention writes at each row's last token when that token's attention
    weights on the positions ``block`` (bool ``[B, seq]``) are zeroed **at that layer only**, from
    one clean forward: Geva et al.'s attribute extraction with the subject blocked.

    The clean weights are not renormalised: the blocked write is the clean output projection's output
    minus the blocked positions' share of it, ``W_o (sum_j p_hj v_hj)`` over blocked ``j`` and every
    head ``h``, then the family's post-attention norm where it has one
    (:func:`lmbook.mechanisms.sublayers.post_norms`). Nothing propagates to later layers. The start
    token (position 0 of an ``encode(..., start=True)`` batch) is never blocked.

    Returns ``{"attention", "blocked", "mlp"}``, each ``[L, B, d]`` float32: the clean attention
    write, the blocked one, and the clean MLP write (:func:`lmbook.mechanisms.sublayers.sublayer_updates`).
    """
    from lmbook.mechanisms.sublayers import out_projection, post_norms, sublayer_updates

    block = torch.as_tensor(block, dtype=torch.bool).clone()
    B, n = batch.input_ids.shape
    if tuple(block.shape) != (B, n):
        raise ParameterError(f"block must be [batch={B}, seq={n}], got {tuple(block.shape)}")
    if _starts_with_start_token(model, batch):
        block[:, 0] = False
    rows, last = batch.rows(), batch.last
    for layer in range(model.num_layers):
        # instrument each attention's source before the trace: the values are read inside the same
        # call before its probabilities, which nnsight cannot instrument once that call has begun
        _ = model.attentions[layer].source
    with torch.no_grad(), trace(model, batch.inputs(), last_only=True):
        vals, probs, pre, att, mlp = (list().save() for _ in range(5))
        for layer in range(model.num_layers):
            vals.append(_values(model, layer))
            probs.append(model.attention_probabilities[layer][rows, :, last])
            pre.append(model.attentions_output[layer][rows, last])
            a, m = sublayer_updates(model, layer)
            att.append(a[rows, last])
            mlp.append(m[rows, last])
    H = model.num_heads
    out = {"attention": [], "blocked": [], "mlp": []}
    for layer in range(model.num_layers):
        _, W, _ = out_projection(model, layer)  # [d, H * hd]
        W = W.cpu()  # every layer's tensors meet on the CPU (a model may be split over devices)
        hd = W.shape[1] // H
        v = vals[layer].float().cpu()
        kv = v.shape[-1] // hd
        v = v.view(B, n, kv, hd).repeat_interleave(H // kv, dim=2)  # [B, n, H, hd]
        p = probs[layer].float().cpu() * block[:, None, :]  # [B, H, n]: the blocked weights only
        c = torch.einsum("bhj,bjhk->bhk", p, v).reshape(B, H * hd)
        blocked = pre[layer].float().cpu() - c @ W.T
        norms = post_norms(model, layer)
        if norms is not None:
            w = norms[0].weight
            with torch.no_grad():
                blocked = norms[0](blocked.to(device=w.device, dtype=w.dtype)).float().cpu()
        out["attention"].append(att[layer].float().cpu())
        out["blocked"].append(blocked)
        out["mlp"].append(mlp[layer].float().cpu())
    return {k: torch.stack(v) for k, v in out.items()}
