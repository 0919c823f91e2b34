"""Reading hidden states and patching them into other runs (activation patching).

Introduced in chapter 1; chapters 3 and 6 build on it. A sweep over layers runs as **one**
batched forward: the target batch is repeated once per layer and row ``i`` is patched only at
its own layer, so ``n`` interventions cost one forward of ``n`` rows instead of ``n`` forwards.
"""

from __future__ import annotations

import torch

from lmbook.core.models import trace
from lmbook.mechanisms.readout import final_logits
from lmbook.core.params import ParameterError, check_layers
from lmbook.core.tokens import Batch

__all__ = ["hidden_states", "sublayer_norms", "patch_sweep", "last_token_logprobs"]


def hidden_states(model, batch: Batch, layers=None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Residual stream after each layer in ``layers`` at ``positions`` (``[B]``; default each row's
    last token). Returns ``[L, B, d]``."""
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    pos = batch.last if positions is None else torch.as_tensor(positions, dtype=torch.long)
    rows = batch.rows()
    with torch.no_grad(), trace(model, batch):
        out = list().save()
        for layer in layers:
            out.append(model.layers_output[layer][rows, pos])
    return torch.stack(out).float().cpu()


def sublayer_norms(model, batch: Batch, row: int = 0) -> dict[str, torch.Tensor]:
    """Norms of what each attention and MLP sublayer writes, and of the residual stream after each
    layer, at every token of prompt ``row``: ``{"attention", "mlp", "residual"} -> [L, seq]``.

    Accesses follow the order of computation (attention, then MLP, then the block's output, layer
    by layer), as nnsight requires. Chapter 1 shows this trace as the first example of reading a model.
    """
    n = int(batch.last[row]) + 1
    with torch.no_grad(), trace(model, batch):
        attn, mlp, resid = list().save(), list().save(), list().save()
        for layer in range(model.num_layers):
            attn.append(model.attentions_output[layer][row, :n].norm(dim=-1))
            mlp.append(model.mlps_output[layer][row, :n].norm(dim=-1))
            resid.append(model.layers_output[layer][row, :n].norm(dim=-1))
    return {"attention": torch.stack(attn).float().cpu(), "mlp": torch.stack(mlp).float().cpu(),
            "residual": torch.stack(resid).float().cpu()}


def last_token_logprobs(model, batch: Batch) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, ``[B, vocab]``."""
    with torch.no_grad(), trace(model, batch, last_only=True):
        lp = final_logits(model, batch, last_only=True).float().log_softmax(-1).save()
    return lp.cpu()


def patch_sweep(
    model,
    source: Batch,
    target: Batch,
    layers=None,
    source_pos: int | None = None,
    target_pos: int | None = None,
) -> torch.Tensor:
    """Patch the source's hidden state into the target prompt, one layer at a time.

    ``source`` and ``target`` hold one prompt each. For each layer ``l`` in ``layers`` the
    residual stream after layer ``l`` at ``target_pos`` of the target run is replaced by the
    source run's at ``source_pos`` (both default to the last token). Returns the next-token
    log-probabilities ``[L + 1, vocab]``: row 0 is the unpatched target, row ``i + 1`` the run
    patched at ``layers[i]``. All ``L + 1`` runs are one batched forward.
    """
    if len(source) != 1 or len(target) != 1:
        raise ParameterError("patch_sweep takes one source prompt and one target prompt")
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    sp = int(source.last[0]) if source_pos is None else source_pos
    tp = int(target.last[0]) if target_pos is None else target_pos
    for name, p, b in (("source_pos", sp, source), ("target_pos", tp, target)):
        if not 0 <= p <= int(b.last[0]):
            raise ParameterError(f"{name}={p} is outside the prompt's tokens 0..{int(b.last[0])}")
    states = hidden_states(model, source, layers, torch.tensor([sp]))[:, 0]  # [L, d]
    n = len(layers) + 1
    rep = target.select([0] * n)
    with torch.no_grad(), trace(model, rep, last_only=True):
        for i, layer in enumerate(layers):
            h = model.layers_output[layer]
            h[i + 1, tp] = states[i].to(h.device, h.dtype)
        lp = final_logits(model, rep, last_only=True).float().log_softmax(-1).save()
    return lp.cpu()
