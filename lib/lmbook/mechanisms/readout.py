"""Reading the residual stream through the final norm and the unembedding: the one home of every
readout in the book.

* in a trace: :func:`final_logits` (the model's own next-token logits), :func:`logit_lens` (every
  layer and position of a batch in one forward, only small summaries leave the trace);
* on vectors already read out: :func:`unembed` (final-norm outputs to logits), :func:`lens_on_states`
  (residual-stream vectors to target log-probabilities and top tokens), :func:`target_logits`
  (only a few tokens' logits), :func:`promoted_tokens` (the tokens a direction promotes);
* the next token after each prompt: :func:`next_token` (top-1 and target log-probabilities, with
  logits at one position only), :func:`next_token_logprobs`, :func:`top1_matches`.

One rule is written here once: :func:`softcap`, the final logit soft-capping some families
(Gemma 2) apply after the unembedding. Introduced in chapter 1 (the logit lens); chapters 2-7 read
through it.
"""

from __future__ import annotations

import dataclasses

import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int, check_layers
from lmbook.core.tokens import Batch

__all__ = ["softcap", "final_logits", "unembed", "lens_on_states", "target_logits", "promoted_tokens", "LensResult",
           "logit_lens", "emergence_layer", "Readings", "next_token", "next_token_logprobs", "last_trace",
           "last_normed", "readings", "top1_matches"]


def softcap(model, logits: torch.Tensor) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` where the model's config sets ``final_logit_softcapping``
    (Gemma 2), else ``logits`` unchanged. The model's own output already includes it; every other
    readout applies it here."""
    cap = getattr(getattr(model, "_model", model).config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def final_logits(model, batch, last_only: bool = False):
    """Inside a :func:`trace`: the logits at each row's last token, ``[B, vocab]``; pass the same
    ``last_only`` as the trace. With ``last_only`` the model computed no logits, and the final norm's
    output at each row's own last token is unembedded here (soft-capped where the model does), so a
    ragged batch costs one unembedding per row."""
    if last_only:
        h = model.ln_final.output[batch.rows(), batch.last]
        return softcap(model, model.lm_head(h))
    return model.logits[batch.rows(), batch.last]


@dataclasses.dataclass
class LensResult:
    """Logit-lens readings. ``L`` = number of layers read, ``B`` = batch, ``P`` = positions read
    (1 when reading each prompt's last token), ``T`` = number of target ids, ``k`` = top-k.

    * ``layers``: the layer indices, length ``L``
    * ``target_logprobs``: ``[L, B, P, T]`` log-probability of each target token
    * ``top_ids`` / ``top_probs``: ``[L, B, P, k]``
    * ``positions``: ``[B, P]`` the token positions read (``-1`` marks padding when ``P`` > a row's length)
    """

    layers: list[int]
    target_logprobs: torch.Tensor | None
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    positions: torch.Tensor


def _positions(batch: Batch, positions) -> torch.Tensor:
    """``[B, P]`` positions: ``None`` = each row's last token, ``"all"`` = every position, or a list/tensor."""
    if positions is None:
        return batch.last[:, None].clone()
    if isinstance(positions, str):
        if positions != "all":
            raise ParameterError(f"positions={positions!r}; use None (last token), 'all', or a [batch, P] tensor")
        width = batch.input_ids.shape[1]
        pos = torch.arange(width).repeat(len(batch), 1)
        return torch.where(batch.attention_mask.bool(), pos, torch.full_like(pos, -1))
    pos = torch.as_tensor(positions, dtype=torch.long)
    if pos.ndim == 1:
        pos = pos[:, None]
    if pos.shape[0] != len(batch):
        raise ParameterError(f"positions has {pos.shape[0]} rows for a batch of {len(batch)} prompts")
    if (pos >= batch.input_ids.shape[1]).any() or (pos < -1).any():
        raise ParameterError(f"positions out of range 0..{batch.input_ids.shape[1] - 1}")
    return pos


def logit_lens(model, batch: Batch, layers=None, positions=None, targets=None, k: int = 5) -> LensResult:
    """Logit lens at ``layers`` (default all) and ``positions`` (default each prompt's last token).

    ``targets``: token ids ``[T]`` shared by all rows, or ``[B, T]`` one set per row; their
    log-probabilities are returned. The reading at the last layer equals the model's own
    output distribution (tested in ``tests/test_readout.py``).
    """
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    check_int("k", k, 1, 1000)
    pos = _positions(batch, positions)
    B, P = pos.shape
    rows = torch.arange(B)[:, None].expand(B, P)
    safe = pos.clamp(min=0)
    tgt = None
    if targets is not None:
        tgt = torch.as_tensor(targets, dtype=torch.long)
        if tgt.ndim == 1:
            tgt = tgt[None].expand(B, -1)
        if tgt.shape[0] != B:
            raise ParameterError(f"targets has {tgt.shape[0]} rows for a batch of {B} prompts")
        tgt = tgt[:, None, :].expand(B, P, tgt.shape[-1])
    with torch.no_grad(), last_trace(model, batch):  # the lens reads states; no logits needed
        tl, ti, tp = list().save(), list().save(), list().save()
        for layer in layers:
            h = model.layers_output[layer][rows, safe]  # [B, P, d]
            lp = softcap(model, model.project_on_vocab(h).float()).log_softmax(-1)
            if tgt is not None:
                tl.append(lp.gather(-1, tgt.to(lp.device)))
            top = lp.topk(k, dim=-1)
            ti.append(top.indices)
            tp.append(top.values.exp())
    return LensResult(
        layers=layers,
        target_logprobs=torch.stack(tl).cpu() if tgt is not None else None,
        top_ids=torch.stack(ti).cpu(),
        top_probs=torch.stack(tp).cpu(),
        positions=pos,
    )


def emergence_layer(top_ids: torch.Tensor, target: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """First layer from which ``target`` stays the top-1 token through the last layer.

    ``top_ids``: ``[L, B]`` top-1 ids by layer; ``target``: ``[B]``. Returns ``[B]`` layer
    indices, ``-1`` where the target is not top-1 at the last layer.
    """
    hit = top_ids == target[None]  # [L, B]
    # suffix-and: hit at every layer from l to the end
    stays = hit.flip(0).cumprod(0).flip(0).bool()
    first = torch.where(stays.any(0), stays.float().argmax(0), torch.full_like(target, -1))
    lay = torch.tensor(layers)
    return torch.where(first >= 0, lay[first.clamp(min=0)], first)


def unembed(model, h: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Logits ``[B, vocab]`` (float32, soft-capped where the model does) from final-norm outputs
    ``h`` ``[B, d]``, ``chunk`` rows at a time."""
    head = model.lm_head._module
    out = []
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk):
            z = head(h[i:i + chunk].to(device=head.weight.device, dtype=head.weight.dtype)).float()
            out.append(softcap(model, z))
    return torch.cat(out) if out else torch.zeros(0, head.weight.shape[0])


def _final_norm(model, states: torch.Tensor) -> torch.Tensor:
    norm, w = model.ln_final._module, model.lm_head._module.weight
    with torch.no_grad():
        return norm(states.to(device=w.device, dtype=w.dtype))


def _check_targets(targets, states):
    tg = torch.as_tensor(targets, dtype=torch.long)
    if tg.ndim != 2 or tg.shape[0] != states.shape[1]:
        raise ParameterError(f"targets must be [B={states.shape[1]}, T], got {tuple(tg.shape)}")
    return tg


def lens_on_states(model, states: torch.Tensor, targets: torch.Tensor, k: int = 1):
    """The logit lens on residual-stream vectors already read out: final norm, then :func:`unembed`.

    ``states``: ``[L, B, d]``; ``targets``: ``[B, T]`` token ids. Returns ``(target_logprobs
    [L, B, T], top_ids [L, B, k])``, one layer at a time so no ``[L, B, vocab]`` tensor is kept.
    """
    tg = _check_targets(targets, states)
    lps, tops = [], []
    for h in states:
        lp = unembed(model, _final_norm(model, h)).log_softmax(-1)
        lps.append(lp.gather(-1, tg.to(lp.device)).cpu())
        tops.append(lp.topk(k, dim=-1).indices.cpu())
    return torch.stack(lps), torch.stack(tops)


def target_logits(model, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logit-lens *logits* of the ``targets`` only (``[L, B, T]``), without the rest of the
    vocabulary: enough to compare two tokens, at a tiny fraction of :func:`lens_on_states`'s cost."""
    head = model.lm_head._module
    tg = _check_targets(targets, states)
    rows = head.weight[tg.to(head.weight.device)].float()  # [B, T, d]
    with torch.no_grad():
        x = _final_norm(model, states).float()  # [L, B, d]
        out = torch.einsum("lbd,btd->lbt", x, rows)
        if getattr(head, "bias", None) is not None:
            out = out + head.bias[tg.to(head.weight.device)].float()
    return softcap(model, out).cpu()


def promoted_tokens(model, direction, k: int = 8) -> list[str]:
    """The ``k`` tokens a direction promotes most when read as a residual stream through the final
    norm and the unembedding (the logit lens applied to the direction alone; chapter 5)."""
    check_int("k", k, 1, 1000)
    h = torch.as_tensor(direction, dtype=torch.float32)[None]
    logits = unembed(model, _final_norm(model, h))[0]
    tok = model.tokenizer
    return [tok.decode([int(i)]) for i in logits.topk(k).indices]


# ---------------------------------------------------------------- the next token


def last_trace(model, batch: Batch, **kwargs):
    """A trace whose model computes no logits: readings take the final norm's output at each row's
    *own* last token (:func:`last_normed`) and unembed it themselves, so a ragged batch never
    materialises ``[rows, positions, vocab]`` logits."""
    return trace(model, batch, last_only=True, **kwargs)


def last_normed(model, batch: Batch):
    """Inside :func:`last_trace`: the final norm's output at each row's last token, ``[B, d]`` (saved)."""
    return model.ln_final.output[batch.rows(), batch.last].save()


@dataclasses.dataclass
class Readings:
    """Next-token readings for ``L`` settings (interventions) and ``B`` prompts.

    * ``top1``: ``[L, B]`` the top-1 next token id
    * ``target_logprob``: ``[L, B]`` log-probability of each prompt's target token (None without targets)
    """

    top1: torch.Tensor
    target_logprob: torch.Tensor | None


def readings(model, h: torch.Tensor, targets: torch.Tensor | None, chunk: int = 128):
    """Top-1 ids ``[B]`` and (with ``targets``) target log-probabilities ``[B]`` from final-norm
    outputs ``h`` ``[B, d]``."""
    tops, lps = [], []
    for i in range(0, h.shape[0], chunk):
        z = unembed(model, h[i:i + chunk], chunk)
        tops.append(z.argmax(-1).cpu())
        if targets is not None:
            lps.append(z.log_softmax(-1).gather(-1, targets[i:i + chunk, None].to(z.device))[:, 0].cpu())
    return torch.cat(tops), (torch.cat(lps) if targets is not None else None)


def next_token(model, batch: Batch, targets: torch.Tensor | None = None) -> Readings:
    """The model's own next-token readings with no intervention: ``top1`` ``[1, B]`` and, with
    ``targets`` ``[B]``, their log-probabilities ``[1, B]``."""
    tg = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    with torch.no_grad(), last_trace(model, batch):
        h = last_normed(model, batch)
    top1, lp = readings(model, h, tg)
    return Readings(top1[None], None if lp is None else lp[None])


def next_token_logprobs(model, batch: Batch) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, ``[B, vocab]``."""
    with torch.no_grad(), trace(model, batch, last_only=True):
        lp = final_logits(model, batch, last_only=True).float().log_softmax(-1).save()
    return lp.cpu()


def top1_matches(model, prompts, target_ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Whether the model's top-1 next token after each prompt is its target id: bool ``[N]``.

    ``target_ids``: ``[N]``. Prompts are sorted by length into batches of ``batch_size`` to limit
    padding, and read with :func:`next_token`. Chapter 2 calls a fact *known* when this holds for
    its attribute's first token (:func:`lmbook.experiments.recall.known_mask`); chapter 3 reuses it.
    """
    from lmbook.core.tokens import encode

    check_int("batch_size", batch_size, 1)
    prompts = list(prompts)
    target_ids = torch.as_tensor(target_ids, dtype=torch.long)
    if len(target_ids) != len(prompts):
        raise ParameterError(f"{len(prompts)} prompts but {len(target_ids)} target ids")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    top1 = torch.empty(len(prompts), dtype=torch.long)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        top1[idx] = next_token(model, encode(model, [prompts[i] for i in idx])).top1[0]
    return top1 == target_ids
