"""Interventions at positions and layers: the one home of every edit the book makes to a forward pass.

* reading states to edit with: :func:`hidden_states` (the residual stream after given layers at
  given positions, logits computed at one position only);
* **patching and adding at the last token** (chapters 1, 6, 7): :func:`patch_sweep` (one
  source state into one target prompt, layer by layer) and :func:`intervene_sweep` (replace or add
  a vector after each of many layers, one batched forward for all of them);
* **directions at every position** (chapter 5): :func:`project_out` / :func:`directional`
  (directional ablation from everything written into the residual stream, and addition after a
  layer), each row of a batch with its own direction.

A sweep over layers runs as **one** batched forward: the batch is repeated once per setting and
copy ``i`` is changed only at its own layer, so ``n`` interventions cost one forward of ``n``
copies instead of ``n`` forwards. Attention knockout, which edits attention weights rather than
the residual stream, lives in :mod:`lmbook.mechanisms.knockout`; generation with an intervention in
:mod:`lmbook.mechanisms.generation`.
"""

from __future__ import annotations

import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int, check_layers
from lmbook.core.tokens import Batch
from lmbook.mechanisms.readout import Readings, final_logits, last_normed, last_trace, readings
from lmbook.mechanisms.sublayers import post_norms

__all__ = ["hidden_states", "patch_sweep", "replicate", "intervene_sweep", "project_out", "unit", "directional",
           "prepare_directional", "directional_chunks", "ablated_residuals"]


def hidden_states(model, batch: Batch, layers=None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Residual stream after each layer in ``layers`` at ``positions`` (``[B]``; default each row's
    last token). Returns ``[L, B, d]``."""
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    pos = batch.last if positions is None else torch.as_tensor(positions, dtype=torch.long)
    rows = batch.rows()
    with torch.no_grad(), last_trace(model, batch):  # no logits are needed
        out = list().save()
        for layer in layers:
            out.append(model.layers_output[layer][rows, pos])
    return torch.stack(out).float().cpu()


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


def replicate(batch: Batch, n: int) -> Batch:
    """``n`` copies of ``batch`` stacked layer-major: row ``i * B + b`` is copy ``i`` of prompt ``b``."""
    check_int("n", n, 1)
    return batch.select([b for _ in range(n) for b in range(len(batch))])


def intervene_sweep(
    model,
    batch: Batch,
    vectors: torch.Tensor,
    layers,
    mode: str = "replace",
    targets: torch.Tensor | None = None,
    max_rows: int = 256,
) -> Readings:
    """Change the residual stream at each prompt's last token, one layer per copy of the batch.

    ``vectors``: ``[L, d]`` (one vector per layer, shared by the prompts) or ``[L, B, d]``.
    For ``i`` in ``range(L)``, copy ``i`` of the batch has the residual stream after layer
    ``layers[i]`` at its last token replaced by (``mode="replace"``, Hendel et al.'s patching) or
    incremented by (``mode="add"``, Todd et al.'s function vectors; a negative vector subtracts)
    ``vectors[i]``. A layer may appear several times (say, with vectors of different scales).
    All copies run in forwards of at most ``max_rows`` rows (whole copies per forward).
    Returns :class:`lmbook.mechanisms.readout.Readings` with ``[L, B]`` readings.
    """
    if mode not in ("replace", "add"):
        raise ParameterError(f"mode={mode!r}; use 'replace' or 'add'")
    layers = list(layers) if not isinstance(layers, int) else [layers]
    checked = check_layers("layers", layers, model.num_layers)
    B = len(batch)
    vec = torch.as_tensor(vectors).float()
    if vec.ndim == 2:
        vec = vec[:, None].expand(-1, B, -1)
    if vec.ndim != 3 or vec.shape[0] != len(checked) or vec.shape[1] != B or vec.shape[2] != model.hidden_size:
        raise ParameterError(
            f"vectors must be [L={len(checked)}, d={model.hidden_size}] or [L, B={B}, d], "
            f"got {tuple(torch.as_tensor(vectors).shape)}"
        )
    tg = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    check_int("max_rows", max_rows, 1)
    per = max(1, max_rows // B)  # copies per forward
    tops, lps = [], []
    for start in range(0, len(checked), per):
        idx = list(range(start, min(start + per, len(checked))))
        rep = replicate(batch, len(idx))
        # visit each layer once, in the order the model computes them (nnsight requires it)
        by_layer: dict[int, list[int]] = {}
        for j, i in enumerate(idx):
            by_layer.setdefault(checked[i], []).append(j)
        with torch.no_grad(), last_trace(model, rep):
            for layer in sorted(by_layer):
                h = model.layers_output[layer]
                for j in by_layer[layer]:
                    rows = torch.arange(j * B, (j + 1) * B)
                    v = vec[idx[j]].to(device=h.device, dtype=h.dtype)
                    if mode == "replace":
                        h[rows, rep.last[rows]] = v
                    else:
                        h[rows, rep.last[rows]] = h[rows, rep.last[rows]] + v
            hf = last_normed(model, rep)
        top1, lp = readings(model, hf, None if tg is None else tg.repeat(len(idx)))
        tops.append(top1.view(len(idx), B))
        if lp is not None:
            lps.append(lp.view(len(idx), B))
    return Readings(torch.cat(tops), torch.cat(lps) if lps else None)


# ---------------------------------------------------------------- directions at every position (chapter 5)


def project_out(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``h - (h . r) r`` for unit ``r``: ``h`` is ``[B, T, d]``, ``r`` is ``[B, d]`` (one direction per
    row) or ``[d]``. A zero ``r`` returns ``h`` unchanged."""
    r = r.to(device=h.device, dtype=h.dtype)
    if r.ndim == 1:
        return h - (h @ r)[..., None] * r
    return h - (h * r[:, None, :]).sum(-1, keepdim=True) * r[:, None, :]


def unit(r: torch.Tensor) -> torch.Tensor:
    """``r`` scaled to unit norm along its last axis; zero rows stay zero."""
    n = r.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, r / n.clamp_min(1e-12), torch.zeros_like(r))


def _ablate_writes(model, layer: int, ablate: torch.Tensor) -> None:
    """Inside a trace: project ``ablate`` out of what ``layer``'s attention and MLP write (after
    Gemma's post-sublayer norms where the model has them, so the write itself is orthogonal)."""
    if post_norms(model, layer) is not None:
        block = model.layers[layer]
        block.post_attention_layernorm.output = project_out(block.post_attention_layernorm.output, ablate)
        block.post_feedforward_layernorm.output = project_out(block.post_feedforward_layernorm.output, ablate)
    else:
        model.attentions_output[layer] = project_out(model.attentions_output[layer], ablate)
        model.mlps_output[layer] = project_out(model.mlps_output[layer], ablate)


def directional(model, ablate, add, seen: list | None = None) -> None:
    """Inside a trace (or a generation step): remove the unit directions ``ablate`` (``[B, d]``, or
    None) from the embedding and from everything each layer writes into the residual stream (its
    attention and MLP writes, read by :func:`lmbook.mechanisms.sublayers.sublayer_updates`, and its
    output), and add ``add[layer]`` (``[B, d]``) to the output of ``layer``. Accesses follow the order
    of computation. With ``seen`` (a saved list), the residual stream entering each layer after the
    first and the final norm is appended to it, as the next module receives it: the tests check on
    this very path that ablation leaves the stream orthogonal to the direction."""
    add = add or {}
    if ablate is not None:
        model.layers_input[0] = project_out(model.layers_input[0], ablate)
    for layer in range(model.num_layers):
        if seen is not None and layer > 0:
            seen.append(model.layers_input[layer])
        if ablate is not None:
            _ablate_writes(model, layer, ablate)
        if ablate is not None or layer in add:
            h = model.layers_output[layer]
            if ablate is not None:
                h = project_out(h, ablate)
            if layer in add:
                h = h + add[layer].to(device=h.device, dtype=h.dtype)[:, None, :]
            model.layers_output[layer] = h
    if seen is not None:
        seen.append(model.ln_final.input)


def _rows(x: torch.Tensor | None, B: int, d: int) -> torch.Tensor | None:
    """A direction for every row: ``[d]`` is broadcast to ``[B, d]``."""
    if x is None:
        return None
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.ndim == 1:
        x = x[None].expand(B, d)
    if x.shape != (B, d):
        raise ParameterError(f"expected a direction of shape [{d}] or [{B}, {d}], got {tuple(x.shape)}")
    return x


def _check_add(model, add, B: int):
    if add is None:
        return {}
    out = {}
    for layer, v in add.items():
        check_int("add layer", layer, 0, model.num_layers - 1)
        out[layer] = _rows(v, B, model.hidden_size)
    return out


def prepare_directional(model, ablate, add, B: int):
    """The interventions for ``B`` rows: ``ablate`` as unit rows ``[B, d]`` (or None) and ``add`` as
    ``{layer: [B, d]}``, checked."""
    ablate = _rows(ablate, B, model.hidden_size)
    return (None if ablate is None else unit(ablate)), _check_add(model, add, B)


def directional_chunks(model, batch: Batch, ablate, add, max_rows: int):
    """Check the interventions once, then yield ``(sub-batch, its ablate rows, its add rows)``,
    ``max_rows`` rows at a time."""
    ablate, add = prepare_directional(model, ablate, add, len(batch))
    for start in range(0, len(batch), max_rows):
        idx = list(range(start, min(len(batch), start + max_rows)))
        yield batch.select(idx), (None if ablate is None else ablate[idx]), {l: v[idx] for l, v in add.items()}


def ablated_residuals(model, batch: Batch, direction) -> torch.Tensor:
    """The residual stream entering each layer and the final norm, ``[L + 1, B, T, d]``, with
    ``direction`` ablated (what the model computes on, read where the next module receives it).
    It runs :func:`directional`, the path every ablation in the book takes; the tests check
    on it that ablation leaves the stream orthogonal to the direction."""
    B, d = len(batch), model.hidden_size
    ab = unit(_rows(direction, B, d))
    with torch.no_grad(), last_trace(model, batch):
        seen = list().save()
        directional(model, ab, None, seen)
    first = project_out(_embed(model, batch), ab)
    return torch.stack([first, *seen]).float()


def _embed(model, batch: Batch) -> torch.Tensor:
    """What the first layer receives without intervention (the scaled token embeddings)."""
    with torch.no_grad(), last_trace(model, batch):
        h = model.layers_input[0].save()
    return h
