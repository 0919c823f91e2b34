"""Interventions at positions and layers: the one home of every edit the book makes to a forward pass.

* reading states to edit with: :func:`hidden_states` (the residual stream after given layers at
  given positions, logits computed at one position only);
* **patching and adding at the last token** (chapters 1, 6, 7): :func:`patch_sweep` (one
  source state into one target prompt, layer by layer) and :func:`intervene_sweep` (replace or add
  a vector after each of many layers, one batched forward for all of them);
* **directions at every position** (chapter 5): :func:`project_out` / :func:`directional`
  (directional ablation from everything written into the residual stream, and addition after a
  layer), each row of a batch with its own direction;
* **the MLP's write at every position** (chapter 7): :func:`mlp_write_sweep` (replace or add to
  what the MLPs of a band of layers write, Merullo et al.'s o-vector intervention).

A sweep over layers runs as **one** batched forward: the batch is repeated once per setting and
copy ``i`` is changed only at its own layer, so ``n`` interventions cost one forward of ``n``
copies instead of ``n`` forwards. Attention knockout, which edits attention weights rather than
the residual stream, lives in :mod:`lmbook.mechanisms.knockout`; generation with an intervention in
:mod:`lmbook.mechanisms.generation`.
"""

from __future__ import annotations

import contextlib

import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int, check_layers
from lmbook.core.tokens import Batch, left_padded
from lmbook.mechanisms.readout import Readings, final_logits, last_normed, last_trace, readings
from lmbook.mechanisms.sublayers import _OUT_PROJ, post_norms, set_mlp_update, sublayer_updates

__all__ = ["hidden_states", "patch_sweep", "replicate", "intervene_sweep", "project_out", "unit", "directional",
           "prepare_directional", "directional_chunks", "ablated_residuals", "orthogonalized_weights",
           "mlp_write_sweep", "prefix_cache", "last_token_inputs"]


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
    """Change the residual stream at each prompt's last token, one layer per copy of the
    batch.

    ``vectors``: ``[L, d]`` (one vector per layer, shared by the prompts) or ``[L, B,
    d]``. For ``i`` in ``range(L)``, copy ``i`` of the batch has the residual stream
    after layer ``layers[i]`` at its last token replaced by (``mode="replace"``, Hendel
    et al.'s patching) or incremented by (``mode="add"``, Todd et al.'s function
    vectors; a negative vector subtracts) ``vectors[i]``. A layer may appear several
    times (say, with vectors of different scales). All copies run in forwards of at most
    ``max_rows`` rows (whole copies per forward). The prompts but their last tokens run
    once (:func:`prefix_cache`); each copy then runs only its last token. Returns
    :class:`lmbook.mechanisms.readout.Readings` with ``[L, B]`` readings."""
    if mode not in ("replace", "add"):
        raise ParameterError(f"mode={mode!r}; use 'replace' or 'add'")
    layers = list(layers) if not isinstance(layers, int) else [layers]
    checked = check_layers("layers", layers, model.num_layers)
    B = len(batch)
    vec = torch.as_tensor(vectors).float()
    if vec.ndim == 2:
        vec = vec[:, None].expand(-1, B, -1)
    if vec.ndim != 3 or tuple(vec.shape) != (len(checked), B, model.hidden_size):
        raise ParameterError(
            f"vectors must be [L={len(checked)}, d={model.hidden_size}] or "
            f"[L, B={B}, d], "
            f"got {tuple(torch.as_tensor(vectors).shape)}"
        )
    tg = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    check_int("max_rows", max_rows, 1)
    per = max(1, max_rows // B)  # copies per forward
    lb, cache = prefix_cache(model, batch)  # all but the last tokens, run once
    tops, lps = [], []
    for start in range(0, len(checked), per):
        idx = list(range(start, min(start + per, len(checked))))
        # each copy runs its last tokens on the shared prefix
        inputs = last_token_inputs(model, lb, cache, len(idx))
        # visit each layer once, in the order the model computes them (as nnsight needs)
        by_layer: dict[int, list[int]] = {}
        for j, i in enumerate(idx):
            by_layer.setdefault(checked[i], []).append(j)
        with torch.no_grad(), trace(model, inputs, last_only=True):
            for layer in sorted(by_layer):
                h = model.layers_output[layer]
                for j in by_layer[layer]:
                    rows = torch.arange(j * B, (j + 1) * B)
                    v = vec[idx[j]].to(device=h.device, dtype=h.dtype)
                    h[rows, -1] = v if mode == "replace" else h[rows, -1] + v
            hf = model.ln_final.output[:, -1].save()
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


# ---------------------------------------------------------------- MLP writes at every position (chapter 7)


def _band_plan(bands, rep: Batch, B: int, vec: torch.Tensor):
    """``{layer: (mask [R, T], vectors [R, d])}`` for the copies of ``rep`` whose band holds
    the layer; the mask keeps positions ``1..last`` of each row (never the attention sink
    at position 0, never the padding)."""
    R, T = rep.input_ids.shape
    pos = torch.arange(T)[None]
    content = (pos >= 1) & (pos <= rep.last[:, None])
    plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for j, band in enumerate(bands):
        rows = slice(j * B, (j + 1) * B)
        for layer in band:
            mask, v = plan.setdefault(
                layer, (torch.zeros(R, T, dtype=torch.bool), torch.zeros(R, vec.shape[-1])))
            mask[rows] = content[rows]
            v[rows] = vec[j]
    return plan


def mlp_write_sweep(model, batch: Batch, vectors: torch.Tensor, bands, mode: str = "replace",
                    targets: torch.Tensor | None = None, max_rows: int = 256) -> Readings:
    """Replace (or add to) what the MLP writes at every position, in a band of layers,
    one setting per copy of the batch.

    ``vectors``: ``[K, d]`` (shared by the prompts) or ``[K, B, d]``; ``bands``: ``K``
    lists of layers. Copy ``i`` has the MLP write (:func:`lmbook.mechanisms.sublayers.
    sublayer_updates`) of every layer in ``bands[i]``, at positions ``1..last`` of each
    prompt, replaced by ``vectors[i]`` (``mode="replace"``: Merullo et al.'s o-vector
    intervention, which swaps the FFN's output for the vector) or incremented by it
    (``"add"``). Position 0, the attention sink, is never touched. All copies run in
    forwards of at most ``max_rows`` rows. Returns ``[K, B]`` readings."""
    if mode not in ("replace", "add"):
        raise ParameterError(f"mode={mode!r}; use 'replace' or 'add'")
    bands = [sorted(set(check_layers(f"bands[{i}]", b, model.num_layers))) if len(b) else []
             for i, b in enumerate(bands)]
    B, d = len(batch), model.hidden_size
    vec = torch.as_tensor(vectors).float()
    if vec.ndim == 2:
        vec = vec[:, None].expand(-1, B, -1)
    if vec.ndim != 3 or tuple(vec.shape) != (len(bands), B, d):
        raise ParameterError(f"vectors must be [K={len(bands)}, d={d}] or [K, B={B}, d], "
                             f"got {tuple(torch.as_tensor(vectors).shape)}")
    tg = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    check_int("max_rows", max_rows, 1)
    per = max(1, max_rows // B)
    tops, lps = [], []
    for start in range(0, len(bands), per):
        idx = list(range(start, min(start + per, len(bands))))
        rep = replicate(batch, len(idx))
        plan = _band_plan([bands[i] for i in idx], rep, B, vec[idx].reshape(len(idx), B, d))
        with torch.no_grad(), last_trace(model, rep):
            for layer in sorted(plan):  # in the order the model computes them
                m = sublayer_updates(model, layer)[1]
                mask, v = plan[layer]
                v = v.to(device=m.device, dtype=m.dtype)[:, None, :]
                new = m + v if mode == "add" else v.expand_as(m)
                set_mlp_update(model, layer, torch.where(mask.to(m.device)[..., None], new, m))
            hf = last_normed(model, rep)
        top1, lp = readings(model, hf, None if tg is None else tg.repeat(len(idx)))
        tops.append(top1.view(len(idx), B))
        if lp is not None:
            lps.append(lp.view(len(idx), B))
    return Readings(torch.cat(tops), torch.cat(lps) if lps else None)


_MLP_OUT = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h")


def _project_rows(w: torch.Tensor, r: torch.Tensor) -> None:
    """In place: remove ``r`` from each row of ``w`` (``[n, d]``: an embedding table)."""
    rr = r.to(device=w.device, dtype=w.dtype)
    w -= (w @ rr)[:, None] * rr[None, :]


def _project_writer(mod: torch.nn.Module, r: torch.Tensor) -> None:
    """In place: remove ``r`` from everything the projection ``mod`` writes, and from its bias."""
    w = mod.weight
    rr = r.to(device=w.device, dtype=w.dtype)
    if type(mod).__name__ == "Conv1D":  # GPT-2 stores [in, out]: the output is the last axis
        _project_rows(w, rr)
    else:  # nn.Linear stores [out, in]
        w -= rr[:, None] * (rr @ w)[None, :]
    if getattr(mod, "bias", None) is not None:
        mod.bias -= (mod.bias @ rr) * rr


def _writers(model) -> list[torch.nn.Module]:
    """Each layer's attention and MLP output projections."""
    out = []
    for l in range(model.num_layers):
        for owner, names in ((model.attentions[l]._module, _OUT_PROJ), (model.mlps[l]._module, _MLP_OUT)):
            mod = next((getattr(owner, n) for n in names if hasattr(getattr(owner, n, None), "weight")), None)
            if mod is None:
                raise ParameterError(f"layer {l}: no output projection named one of {names} in {type(owner).__name__}")
            out.append(mod)
    return out


@contextlib.contextmanager
def orthogonalized_weights(model, direction):
    """Arditi et al.'s weight form of directional ablation, for the duration of a ``with`` block:
    the unit ``direction`` is projected out of every weight that writes into the residual stream
    (token and position embeddings, each attention block's output projection, each MLP's output
    projection, and their biases), so no sublayer can write along it. The weights are restored on
    exit, also after an error.

    Without post-sublayer norms this computes what :func:`directional` does at run time (chapter 5
    checks it on its own model; ``tests/test_interventions.py`` on tiny models). Gemma 2/3 normalise
    each write again with a learned gain, which can turn it back towards the direction, so there the
    edit is not equivalent and a :class:`ParameterError` says so. Tied input and output embeddings
    are untied for the block, so the unembedding is not edited."""
    if any(post_norms(model, l) is not None for l in range(model.num_layers)):
        raise ParameterError("weight orthogonalisation equals directional ablation only without post-sublayer "
                             "norms; this model normalises each sublayer's write again (Gemma 2/3)")
    r = unit(torch.as_tensor(direction, dtype=torch.float32).flatten())
    if r.shape != (model.hidden_size,) or not bool(r.any()):
        raise ParameterError(f"direction must be a non-zero vector of size {model.hidden_size}")
    hf = model._model
    writers = _writers(model)
    emb = hf.get_input_embeddings()
    pos = getattr(getattr(hf, "transformer", None), "wpe", None)  # GPT-2's learned positions
    tables = [pos.weight] if pos is not None else []
    saved = [(p, p.detach().clone()) for m in writers for p in m.parameters(recurse=False)]
    saved += [(w, w.detach().clone()) for w in tables]
    tied = emb.weight
    try:
        emb.weight = torch.nn.Parameter(tied.detach().clone(), requires_grad=False)  # untied for the block
        with torch.no_grad():
            for m in writers:
                _project_writer(m, r)
            for w in tables + [emb.weight]:
                _project_rows(w, r)
        yield model
    finally:
        emb.weight = tied
        with torch.no_grad():
            for p_, w in saved:
                p_.copy_(w)


# ---------------------------------------------------------------- edits at the last token on a shared prefix


def prefix_cache(model, batch: Batch):
    """``batch`` left-padded, and the keys and values of every row's tokens but its last.

    An edit at the last token changes nothing before it, so every edited copy of a prompt shares
    that prefix: it is run once here, and each copy then runs only its last token on top of it
    (:func:`last_token_inputs`). Chapter 2's attention knockout and chapter 6's head effects use it.
    The cache is ``None`` (whole prompts are rerun) for a model traced remotely, whose cache cannot
    be kept between requests, or a one-token prompt."""
    lb = left_padded(model, batch)
    if getattr(model, "lmbook_remote", False) or int(lb.attention_mask[:, :-1].sum(1).min()) == 0:
        return lb, None
    pos = (lb.attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": lb.input_ids[:, :-1], "attention_mask": lb.attention_mask[:, :-1],
              "position_ids": pos[:, :-1]}
    with torch.no_grad(), trace(model, inputs, use_cache=True, last_only=True):
        out = model.output.save()
    return lb, out.cache


def last_token_inputs(model, lb: Batch, cache, n: int, order: str = "copy") -> dict:
    """Model inputs for ``n`` copies of the left-padded ``lb``: the last token on top of the cached
    prefix (``cache`` from :func:`prefix_cache`), or the whole rows when ``cache`` is None. Either way
    each row's last token is the last column. ``order="copy"``: copy-major, like :func:`replicate`
    (row ``i * B + b`` is copy ``i`` of prompt ``b``); ``order="row"``: prompt-major (row
    ``b * n + i``)."""
    from transformers import DynamicCache

    if order not in ("copy", "row"):
        raise ParameterError(f"order={order!r}; use 'copy' or 'row'")

    def rep(x, dim=0):
        return x.repeat(*([n] + [1] * (x.ndim - 1))) if order == "copy" else x.repeat_interleave(n, dim)

    mask = rep(lb.attention_mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if cache is None:
        return {"input_ids": rep(lb.input_ids), "attention_mask": mask, "position_ids": pos}
    kv = [(rep(layer.keys), rep(layer.values)) for layer in cache.layers]
    return {"input_ids": rep(lb.input_ids[:, -1:]), "attention_mask": mask, "position_ids": pos[:, -1:],
            "cache": DynamicCache(kv, config=getattr(model, "config", None))}
