"""The logit lens: read each layer's residual stream through the final norm and unembedding.

Introduced in chapter 1 and used in chapters 3 and 6. One traced forward covers every requested
layer and every prompt of a batch; only small summaries (target log-probabilities, top-k tokens)
leave the trace, never a ``[layers, batch, vocab]`` tensor per position.
"""

from __future__ import annotations

import dataclasses

import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int, check_layers
from lmbook.core.tokens import Batch

__all__ = ["final_logits", "LensResult", "logit_lens", "emergence_layer"]


def final_logits(model, batch, last_only: bool = False):
    """Inside a :func:`trace`: the logits at each row's last token, ``[B, vocab]``; pass the same
    ``last_only`` as the trace."""
    if last_only:
        col = torch.searchsorted(torch.unique(batch.last), batch.last)
        return model.logits[batch.rows(), col]
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
    output distribution (tested in ``tests/test_lens.py``).
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
    with torch.no_grad(), trace(model, batch):
        tl, ti, tp = list().save(), list().save(), list().save()
        for layer in layers:
            h = model.layers_output[layer][rows, safe]  # [B, P, d]
            lp = model.project_on_vocab(h).float().log_softmax(-1)
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
