"""How likely a model finds a text: the masked next-token loss, in one place.

Used by chapter 3 (perplexity, bits per byte, training), chapter 4 (the fluency cost of steering)
and chapter 5 (the cost of ablating or adding a direction).
"""

from __future__ import annotations

import torch

__all__ = ["logits_nll"]


def logits_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in nats: ``logits`` ``[B, T, V]`` predict ``input_ids[:, 1:]``;
    returns ``[B, T-1]`` with 0 where ``target_mask`` (``[B, T-1]``) is 0."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(logits.device), reduction="none"
    )
    return nll * target_mask.to(nll.device)
