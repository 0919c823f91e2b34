"""What each sublayer writes into the residual stream.

For most families the attention and MLP blocks' outputs (nnterp's ``attentions_output`` and
``mlps_output``) are added to the residual stream as they are. Gemma 2 and 3 normalise each
sublayer's output again before adding it (``post_attention_layernorm``,
``post_feedforward_layernorm``); there the write is that norm's output, which nnterp does not name.
This module is the one place that knows the difference; chapter 2 projects the writes to the
vocabulary (attribute extraction), chapter 6 splits the attention write into heads, chapter 7
reads the MLP write as a relation vector.
"""

from __future__ import annotations

import torch

from lmbook.core.params import ParameterError, check_layers
from lmbook.core.tokens import Batch
from lmbook.mechanisms.readout import last_trace

__all__ = ["post_norms", "sublayer_updates", "sublayer_writes", "sublayer_norms", "out_projection",
           "head_contributions", "set_mlp_update"]


def post_norms(model, layer: int):
    """The norms Gemma 2/3 apply to the attention and MLP outputs before adding them to the residual
    stream, as ``(post_attention_layernorm, post_feedforward_layernorm)`` modules, or None for
    pre-norm models (Llama, Qwen, GPT-2, GPT-J).

    A decoder layer with a ``post_feedforward_layernorm`` normalises both sublayers' outputs; in
    pre-norm models ``post_attention_layernorm`` is the MLP's *input* norm, so the name alone does
    not decide. This is the one test of the difference in the library."""
    lay = model.layers[layer]._module
    if getattr(lay, "post_feedforward_layernorm", None) is not None:
        return lay.post_attention_layernorm, lay.post_feedforward_layernorm
    return None


def sublayer_updates(model, layer: int):
    """Inside a trace: what the attention and the MLP sublayer of ``layer`` add to the residual
    stream, as ``(attention_update, mlp_update)``, each ``[batch, seq, d]``.

    For most families these are nnterp's ``attentions_output`` and ``mlps_output``. Gemma 2/3
    normalise each sublayer's output again before adding it (``post_attention_layernorm``,
    ``post_feedforward_layernorm``); there the update is that norm's output, which nnterp does not
    name. Chapter 2 projects these updates to the vocabulary (attribute extraction).
    """
    if post_norms(model, layer) is not None:
        block = model.layers[layer]
        return block.post_attention_layernorm.output, block.post_feedforward_layernorm.output
    return model.attentions_output[layer], model.mlps_output[layer]


def sublayer_writes(model, batch: Batch, layers=None) -> dict[str, torch.Tensor]:
    """At each prompt's last token and each of ``layers`` (default all): what the
    attention block and the MLP write into the residual stream, and the residual stream
    after the layer.

    Returns ``{"attn", "mlp", "resid"}`` each ``[L, B, d]``. The residual stream between
    the two sublayers (what the MLP reads) is ``resid - mlp``."""
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    rows, pos = batch.rows(), batch.last
    with torch.no_grad(), last_trace(model, batch):  # no logits needed
        attn, mlp, resid = list().save(), list().save(), list().save()
        for l in layers:
            a, m = sublayer_updates(model, l)
            attn.append(a[rows, pos])
            mlp.append(m[rows, pos])
            resid.append(model.layers_output[l][rows, pos])
    parts = {"attn": attn, "mlp": mlp, "resid": resid}
    return {k: torch.stack(v).float().cpu() for k, v in parts.items()}


def sublayer_norms(model, batch: Batch, row: int = 0) -> dict[str, torch.Tensor]:
    """Norms of what each attention and MLP sublayer writes, and of the residual stream
    after each layer, at every token of prompt ``row``: ``{"attention", "mlp",
    "residual"} -> [L, seq]``.

    Accesses follow the order of computation (attention, then MLP, then the block's
    output, layer by layer), as nnsight requires. Chapter 1 shows this trace as the
    first example of reading a model."""
    n = int(batch.last[row]) + 1
    with torch.no_grad(), last_trace(model, batch):
        attn, mlp, resid = list().save(), list().save(), list().save()
        for layer in range(model.num_layers):
            a, m = sublayer_updates(model, layer)
            attn.append(a[row, :n].norm(dim=-1))
            mlp.append(m[row, :n].norm(dim=-1))
            resid.append(model.layers_output[layer][row, :n].norm(dim=-1))
    parts = {"attention": attn, "mlp": mlp, "residual": resid}
    return {k: torch.stack(v).float().cpu() for k, v in parts.items()}


# ---------------------------------------------------------------- per-head writes (chapter 6)


_OUT_PROJ = ("o_proj", "c_proj", "out_proj", "dense")


def out_projection(model, layer: int):
    """Name, weight ``[d, heads * head_dim]`` (as ``y = W x``) and bias (``[d]`` or None) of the
    attention block's output projection at ``layer``; raises for an architecture without one."""
    attn = model.attentions[layer]._module
    for name in _OUT_PROJ:
        mod = getattr(attn, name, None)
        if mod is not None and hasattr(mod, "weight"):
            w = mod.weight
            if type(mod).__name__ == "Conv1D":  # GPT-2 stores [in, out]
                w = w.T
            return name, w.detach().float(), None if getattr(mod, "bias", None) is None else mod.bias.detach().float()
    raise ParameterError(
        f"the attention block {type(attn).__name__} has no output projection named one of {_OUT_PROJ}; "
        "function vectors need per-head outputs"
    )


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def head_contributions(model, batch: Batch, layers=None) -> dict[str, torch.Tensor]:
    """What each attention head writes into the residual stream at each prompt's last token.

    Returns ``{"z": [L, B, H, hd], "heads": [L, B, H, d], "bias": [L, B, d], "attn": [L, B, d]}``:
    the per-head inputs of the output projection, each head's contribution, the projection bias's
    contribution (zeros without a bias), and the attention block's total write into the residual
    stream, for which ``heads.sum(2) + bias == attn`` (up to float error). For a post-norm model the
    norm's per-token scale ``g / rms(o)`` (``o`` = projection output) multiplies every head.
    """
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    names = {l: out_projection(model, l)[0] for l in layers}
    norms = {l: (post_norms(model, l) or (None,))[0] for l in layers}
    rows, pos = batch.rows(), batch.last
    with torch.no_grad(), last_trace(model, batch):
        zs, os_, ws = list().save(), list().save(), list().save()
        for l in layers:
            zs.append(getattr(model.attentions[l], names[l]).input[rows, pos])
            os_.append(model.attentions_output[l][rows, pos])
            if norms[l] is not None:
                ws.append(model.layers[l].post_attention_layernorm.output[rows, pos])
    H = model.num_heads
    z_all, heads, biases, writes = [], [], [], []
    wi = 0
    for i, l in enumerate(layers):
        _, W, b = out_projection(model, l)
        z = zs[i].float()  # [B, H*hd]
        hd = z.shape[-1] // H
        zh = z.view(len(batch), H, hd)
        c = torch.einsum("dhk,bhk->bhd", W.view(W.shape[0], H, hd), zh)  # [B, H, d]
        bias = torch.zeros(len(batch), W.shape[0], device=W.device) if b is None else b.expand(len(batch), -1).clone()
        write = os_[i].float()
        norm = norms[l]
        if norm is not None:
            eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
            o = write
            # g * x / rms(o) for each part x, computed through the module itself: norm(x) * rms(x) = g * x
            scale = 1.0 / _rms(o, eps)  # [B, 1]
            with torch.no_grad():
                gx = norm(c) .float() * _rms(c, eps)
                gb = norm(bias).float() * _rms(bias, eps) if b is not None else bias
            c = gx * scale[:, None]
            bias = gb * scale
            write = ws[wi].float()
            wi += 1
        z_all.append(zh)
        heads.append(c)
        biases.append(bias)
        writes.append(write)
    parts = {"z": z_all, "heads": heads, "bias": biases, "attn": writes}
    return {k: torch.stack(v).float().cpu() for k, v in parts.items()}


# ---------------------------------------------------------------- writing the MLP's update (chapter 7)


def set_mlp_update(model, layer: int, value) -> None:
    """Inside a trace: make ``value`` (``[batch, seq, d]``) what the MLP of ``layer``
    adds to the residual stream, the counterpart of :func:`sublayer_updates`' second
    item (after Gemma's ``post_feedforward_layernorm`` where the model has one).
    Chapter 7 replaces the MLP's write at every position with a relation vector."""
    if post_norms(model, layer) is not None:
        model.layers[layer].post_feedforward_layernorm.output = value
    else:
        model.mlps_output[layer] = value
