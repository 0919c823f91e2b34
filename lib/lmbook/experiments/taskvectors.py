"""Task vectors (Hendel et al., 2023) and function vectors (Todd et al., 2024).

Introduced in chapter 6. Both claim that in-context learning compresses the demonstrations into a
vector at the last token, which can be cut out of one prompt and put into another:

* a **task vector** is the residual stream after layer ``l`` at the last token of few-shot prompts
  (averaged over a few); *patching* it over the same state of a zero-shot prompt ``"x →"`` should
  make the model answer ``f(x)`` (:func:`task_vectors`, :func:`intervene_sweep` with ``mode="replace"``);
* a **function vector** is the sum of the mean outputs of the few attention heads whose outputs most
  restore the answer on prompts with shuffled labels; it is *added* to the residual stream
  (:func:`head_contributions`, :func:`head_patch_effects`, :func:`function_vector`).

Every sweep is one batched forward (or a few, ``max_rows`` rows each): the prompts are repeated
once per layer (or head), and each copy is changed only at its own layer (or head).

Per-head outputs. nnterp's ``attentions_output[l]`` is the attention block's output *after* its
output projection, i.e. already summed over heads. The per-head outputs are the **input** of that
projection (``o_proj`` in Llama, Gemma and Qwen; ``c_proj`` in GPT-2; ``out_proj`` in GPT-J), read in
a trace as ``model.attentions[l].o_proj.input``, shape ``[batch, seq, heads * head_dim]``, head ``h``
in columns ``h*head_dim:(h+1)*head_dim``. Head ``h``'s contribution to the residual stream is its
slice times the matching columns of the projection's weight. Gemma 2 and 3 normalise the
attention output again before adding it (``post_attention_layernorm``); an RMS norm is a diagonal
scale for a given token, so with that token's scale held fixed the heads' contributions still add
up exactly to what the attention block writes (:func:`head_contributions`, tested in
``tests/test_taskvectors.py``).
"""

from __future__ import annotations

import dataclasses

import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int, check_layers
from lmbook.core.tokens import Batch, pad_token_id

__all__ = [
    "last_token_states",
    "task_vectors",
    "replicate",
    "next_token",
    "intervene_sweep",
    "SweepResult",
    "batch_from_ids",
    "greedy_tokens",
    "greedy_generate",
    "cached_greedy_tokens",
    "unembed",
    "out_projection",
    "post_norm",
    "head_contributions",
    "head_patch_effects",
    "top_heads",
    "function_vector",
    "TaskVectorRun",
    "run_task_vectors",
    "FunctionVectorRun",
    "run_function_vector",
]


# ---------------------------------------------------------------- next-token logits, cheaply


def _trace(model, batch: Batch):
    """A trace whose model computes logits at the padded sequence's last position only: the
    readings below take the final norm's output at each row's *own* last token and unembed it
    themselves, so a ragged batch never materialises ``[rows, positions, vocab]`` logits."""
    return trace(model, batch, logits_to_keep=1)


def _final_normed(model, batch: Batch):
    """Inside :func:`_trace`: the final norm's output at each row's last token, ``[B, d]`` (saved)."""
    return model.ln_final.output[batch.rows(), batch.last].save()


def unembed(model, h: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Logits ``[B, vocab]`` from final-norm outputs ``h`` ``[B, d]``: the model's unembedding
    (and Gemma 2's final soft-capping where the config asks for it), ``chunk`` rows at a time."""
    head = model.lm_head._module
    cap = getattr(model._model.config, "final_logit_softcapping", None)
    out = []
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk):
            z = head(h[i:i + chunk].to(device=head.weight.device, dtype=head.weight.dtype)).float()
            if cap:
                z = torch.tanh(z / cap) * cap
            out.append(z)
    return torch.cat(out)


def _readings(model, h: torch.Tensor, targets: torch.Tensor | None, chunk: int = 128):
    """Top-1 ids ``[B]`` and (with ``targets``) target log-probabilities ``[B]`` from ``h`` ``[B, d]``."""
    tops, lps = [], []
    for i in range(0, h.shape[0], chunk):
        z = unembed(model, h[i:i + chunk], chunk)
        tops.append(z.argmax(-1).cpu())
        if targets is not None:
            lps.append(z.log_softmax(-1).gather(-1, targets[i:i + chunk, None].to(z.device))[:, 0].cpu())
    return torch.cat(tops), (torch.cat(lps) if targets is not None else None)


# ---------------------------------------------------------------- task vectors (Hendel et al.)


def last_token_states(model, batch: Batch, layers=None) -> torch.Tensor:
    """Residual stream after each of ``layers`` (default all) at each prompt's last token,
    ``[L, B, d]``. Like :func:`lmbook.mechanisms.interventions.hidden_states`, but the trace asks for logits at
    one position only, which with Gemma's 262k-token vocabulary is most of a forward's work."""
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    rows, pos = batch.rows(), batch.last
    with torch.no_grad(), _trace(model, batch):
        out = list().save()
        for layer in layers:
            out.append(model.layers_output[layer][rows, pos])
    return torch.stack(out).float()


def task_vectors(model, batch: Batch, layers=None, group: int | None = None) -> torch.Tensor:
    """Mean of the residual stream after each layer at the prompts' last token.

    ``group=None``: the mean over all prompts of ``batch``, ``[L, d]`` (``L`` = number of
    ``layers``, default all). ``group=n``: means over consecutive groups of ``n`` prompts (the
    dummy-query prompts of one demonstration set), ``[L, len(batch) // n, d]``."""
    h = last_token_states(model, batch, layers)  # [L, B, d]
    if group is None:
        return h.mean(1)
    check_int("group", group, 1)
    if len(batch) % group:
        raise ParameterError(f"a batch of {len(batch)} prompts does not split into groups of {group}")
    return h.view(h.shape[0], len(batch) // group, group, h.shape[-1]).mean(2)


def replicate(batch: Batch, n: int) -> Batch:
    """``n`` copies of ``batch`` stacked layer-major: row ``i * B + b`` is copy ``i`` of prompt ``b``."""
    check_int("n", n, 1)
    return batch.select([b for _ in range(n) for b in range(len(batch))])


@dataclasses.dataclass
class SweepResult:
    """Next-token readings after an intervention sweep, for ``L`` settings and ``B`` prompts.

    * ``top1``: ``[L, B]`` the top-1 next token id
    * ``target_logprob``: ``[L, B]`` log-probability of each prompt's target token (None without targets)
    """

    top1: torch.Tensor
    target_logprob: torch.Tensor | None


def next_token(model, batch: Batch, targets: torch.Tensor | None = None) -> SweepResult:
    """The model's own next-token readings with no intervention: ``top1`` ``[1, B]`` and, with
    ``targets`` ``[B]``, their log-probabilities ``[1, B]``."""
    tg = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    with torch.no_grad(), _trace(model, batch):
        h = _final_normed(model, batch)
    top1, lp = _readings(model, h, tg)
    return SweepResult(top1[None], None if lp is None else lp[None])


def intervene_sweep(
    model,
    batch: Batch,
    vectors: torch.Tensor,
    layers,
    mode: str = "replace",
    targets: torch.Tensor | None = None,
    max_rows: int = 256,
) -> SweepResult:
    """Change the residual stream at each prompt's last token, one layer per copy of the batch.

    ``vectors``: ``[L, d]`` (one vector per layer, shared by the prompts) or ``[L, B, d]``.
    For ``i`` in ``range(L)``, copy ``i`` of the batch has the residual stream after layer
    ``layers[i]`` at its last token replaced by (``mode="replace"``, Hendel et al.'s patching) or
    incremented by (``mode="add"``, Todd et al.'s function vectors; a negative vector subtracts)
    ``vectors[i]``. A layer may appear several times (say, with vectors of different scales).
    All copies run in forwards of at most ``max_rows`` rows (whole copies per forward).
    Returns :class:`SweepResult` with ``[L, B]`` readings.
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
            f"vectors must be [L={len(checked)}, d={model.hidden_size}] or [L, B={B}, d], got {tuple(torch.as_tensor(vectors).shape)}"
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
        with torch.no_grad(), _trace(model, rep):
            for layer in sorted(by_layer):
                h = model.layers_output[layer]
                for j in by_layer[layer]:
                    rows = torch.arange(j * B, (j + 1) * B)
                    v = vec[idx[j]].to(device=h.device, dtype=h.dtype)
                    if mode == "replace":
                        h[rows, rep.last[rows]] = v
                    else:
                        h[rows, rep.last[rows]] = h[rows, rep.last[rows]] + v
            hf = _final_normed(model, rep)
        top1, lp = _readings(model, hf, None if tg is None else tg.repeat(len(idx)))
        tops.append(top1.view(len(idx), B))
        if lp is not None:
            lps.append(lp.view(len(idx), B))
    return SweepResult(torch.cat(tops), torch.cat(lps) if lps else None)


# ---------------------------------------------------------------- greedy multi-token answers


def batch_from_ids(ids: list[list[int]], pad_id: int) -> Batch:
    """A right-padded :class:`Batch` from token id lists (no offsets)."""
    width = max(len(r) for r in ids)
    inp = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, r in enumerate(ids):
        inp[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return Batch(["<ids>"] * len(ids), inp, mask, mask.sum(1) - 1, None)


def greedy_tokens(
    model,
    batch: Batch,
    n_tokens: int,
    layer: int | None = None,
    vectors: torch.Tensor | None = None,
    mode: str = "replace",
    patch_rows=None,
) -> list[list[int]]:
    """Greedy continuations of up to ``n_tokens`` token ids for each prompt.

    With ``layer`` and ``vectors`` the residual stream after ``layer`` at the *original* last
    token of the rows ``patch_rows`` (default all) is replaced (or incremented, ``mode="add"``)
    by ``vectors`` (``[d]``, or one row per patched row) in every forward; since later positions
    only read that position's state, this equals patching it once and caching. One full forward
    per generated token (no cache), all prompts batched; stops early once every continuation
    holds a line break after its first non-blank text (one pair a line, so the answer is complete).
    The first id of each continuation is the model's top-1 next token.
    """
    check_int("n_tokens", n_tokens, 1)
    tok = model.tokenizer
    pad = pad_token_id(tok)
    ids = [batch.input_ids[i, : int(batch.last[i]) + 1].tolist() for i in range(len(batch))]
    vec = None
    if layer is not None:
        if mode not in ("replace", "add"):
            raise ParameterError(f"mode={mode!r}; use 'replace' or 'add'")
        layer = check_layers("layer", layer, model.num_layers)[0]
        prow = torch.arange(len(batch)) if patch_rows is None else torch.as_tensor(patch_rows, dtype=torch.long)
        ppos = batch.last[prow]
        vec = torch.as_tensor(vectors).float()
        if vec.ndim == 1:
            vec = vec[None].expand(len(prow), -1)
        if vec.shape != (len(prow), model.hidden_size):
            raise ParameterError(f"vectors must be [d] or [{len(prow)}, {model.hidden_size}], got {tuple(vec.shape)}")
    new = [[] for _ in ids]
    for _ in range(n_tokens):
        b = batch_from_ids([r + n for r, n in zip(ids, new)], pad)
        with torch.no_grad(), _trace(model, b):
            if vec is not None:
                h = model.layers_output[layer]
                v = vec.to(device=h.device, dtype=h.dtype)
                h[prow, ppos] = v if mode == "replace" else h[prow, ppos] + v
            hf = _final_normed(model, b)
        nxt, _ = _readings(model, hf, None)
        for r, t in zip(new, nxt.tolist()):
            r.append(t)
        if all("\n" in tok.decode(r).lstrip("\n") for r in new):
            break
    return new


def cached_greedy_tokens(model, prompts, n_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``n_tokens`` token ids for prompts that need no intervention, with
    the model's own ``generate`` (key-value cache, left padding): one full forward and then one
    token per step, instead of :func:`greedy_tokens`' full forward per step. Chapter 6 uses it for
    the long few-shot prompts; its first ids equal :func:`next_token`'s (tested)."""
    check_int("n_tokens", n_tokens, 1)
    tok = model.tokenizer
    pad = pad_token_id(tok)
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        enc = tok(list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    with torch.no_grad():
        out = model._model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                    pad_token_id=pad, top_p=None, top_k=None, temperature=None)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def greedy_generate(model, batch: Batch, n_tokens: int, layer: int | None = None, vectors: torch.Tensor | None = None,
                    mode: str = "replace", patch_rows=None) -> list[str]:
    """:func:`greedy_tokens`, decoded to text."""
    return [model.tokenizer.decode(r) for r in greedy_tokens(model, batch, n_tokens, layer, vectors, mode, patch_rows)]


# ---------------------------------------------------------------- function vectors (Todd et al.)


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


def post_norm(model, layer: int):
    """The norm applied to the attention output before it enters the residual stream (Gemma 2/3's
    ``post_attention_layernorm``), or None for pre-norm models (Llama, Qwen, GPT-2, GPT-J).

    A decoder layer with a ``post_feedforward_layernorm`` normalises both sublayers' outputs; in
    pre-norm models ``post_attention_layernorm`` is the MLP's *input* norm, so the name alone
    does not decide."""
    lay = model.layers[layer]._module
    if getattr(lay, "post_feedforward_layernorm", None) is not None:
        return lay.post_attention_layernorm
    return None


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
    norms = {l: post_norm(model, l) for l in layers}
    rows, pos = batch.rows(), batch.last
    with torch.no_grad(), _trace(model, batch):
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


def head_patch_effects(
    model,
    batch: Batch,
    mean_z: torch.Tensor,
    targets: torch.Tensor,
    layers=None,
    max_rows: int = 256,
) -> torch.Tensor:
    """Causal effect of each head's mean output on prompts that do not show the task.

    ``batch``: prompts with shuffled labels; ``mean_z``: ``[L, H, hd]`` each head's mean input to the
    output projection on clean prompts (for ``layers``, default all); ``targets``: ``[B]`` the
    correct answers' token ids. For each head, its slice of the output projection's input at the
    last token is replaced by the mean, and the effect is the probability of the target after the
    patch minus without it, averaged over the prompts (Todd et al.'s average indirect effect).
    One batched row per (head, prompt); forwards of at most ``max_rows`` rows. Returns ``[L, H]``.
    """
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    H = model.num_heads
    if mean_z.shape[:2] != (len(layers), H):
        raise ParameterError(f"mean_z must be [L={len(layers)}, H={H}, head_dim], got {tuple(mean_z.shape)}")
    hd = mean_z.shape[-1]
    tg = torch.as_tensor(targets, dtype=torch.long)
    B = len(batch)
    base = next_token(model, batch, tg).target_logprob[0].exp()  # [B]
    names = {l: out_projection(model, l)[0] for l in layers}
    units = [(i, h) for i in range(len(layers)) for h in range(H)]
    per = max(1, max_rows // B)
    effects = torch.zeros(len(layers), H)
    for start in range(0, len(units), per):
        chunk = units[start:start + per]
        rep = replicate(batch, len(chunk))
        with torch.no_grad(), _trace(model, rep):
            for j, (i, h) in enumerate(chunk):  # units are ordered by layer
                if j == 0 or chunk[j - 1][0] != i:
                    z = getattr(model.attentions[layers[i]], names[layers[i]]).input
                rows = torch.arange(j * B, (j + 1) * B)
                z[rows, rep.last[rows], h * hd:(h + 1) * hd] = mean_z[i, h].to(device=z.device, dtype=z.dtype)
            hf = _final_normed(model, rep)
        p = _readings(model, hf, tg.repeat(len(chunk)))[1].exp().view(len(chunk), B)
        for j, (i, h) in enumerate(chunk):
            effects[i, h] = (p[j] - base).mean()
    return effects


def top_heads(effects: torch.Tensor, k: int, layers=None) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the largest effect, best first; ``effects`` is ``[L, H]``
    over ``layers`` (default ``0..L-1``)."""
    L, H = effects.shape
    check_int("k", k, 1, L * H)
    layers = list(range(L)) if layers is None else list(layers)
    flat = effects.flatten().topk(k).indices
    return [(layers[int(i) // H], int(i) % H) for i in flat]


def function_vector(mean_heads: torch.Tensor, heads: list[tuple[int, int]], layers=None) -> torch.Tensor:
    """Sum of the chosen heads' mean contributions to the residual stream: ``[d]``.

    ``mean_heads``: ``[L, H, d]`` (``head_contributions(...)["heads"].mean(1)``) over ``layers``
    (default ``0..L-1``); ``heads``: (layer, head) pairs from :func:`top_heads`."""
    layers = list(range(mean_heads.shape[0])) if layers is None else list(layers)
    return torch.stack([mean_heads[layers.index(l), h] for l, h in heads]).sum(0)


# ---------------------------------------------------------------- the chapter's protocols


@dataclasses.dataclass
class TaskVectorRun:
    """One task through Hendel et al.'s protocol (:func:`run_task_vectors`).

    * ``val_curve``: ``[L]`` first-token accuracy of the validation queries' zero-shot prompts
      patched with their task vector after each layer
    * ``layer``: the layer with the best ``val_curve`` (the earliest on ties), used for the test queries
    * ``first_token`` / ``greedy``: ``{"baseline", "task vector", "ICL"} -> [N_TEST]`` bool
    * ``generations``: the greedy continuations behind ``greedy``
    """

    task: str
    val_curve: torch.Tensor
    layer: int
    first_token: dict
    greedy: dict
    generations: dict
    test: tuple
    icl_example: str


def _encode(model, prompts):
    from lmbook.core.tokens import encode

    return encode(model, prompts)


def run_task_vectors(model, split, k: int, n_dummy: int, seed: int = 0, prefix: str = "",
                     max_rows: int = 256) -> TaskVectorRun:
    """Zero-shot baseline, in-context (ICL) and task-vector accuracy for one task split.

    For every query (validation and test), ``k`` demonstrations are drawn from ``split.demos``;
    the ICL prompt is those demonstrations and the query, and the query's task vector is the
    last-token residual stream of ``n_dummy`` prompts with the same demonstrations and a dummy
    query, averaged. On the validation queries it is patched into the zero-shot prompt
    ``"query →"`` after every layer (one batched sweep); the layer with the best validation
    accuracy is the only one used on the test queries. Scores: first-token match, and on the
    test queries also greedy multi-token match.
    """
    from lmbook.data.tasks import (answer_token_ids, first_token_correct, greedy_match, task_vector_prompts,
                        zero_shot_prompt)

    L = model.num_layers
    val_q, test_q = [x for x, _ in split.val], [x for x, _ in split.test]
    _, dummy_val = task_vector_prompts(split.demos, val_q, k, n_dummy, seed=seed, prefix=prefix)
    icl_test, dummy_test = task_vector_prompts(split.demos, test_q, k, n_dummy, seed=seed + 1, prefix=prefix)
    tv = task_vectors(model, _encode(model, dummy_val + dummy_test), group=n_dummy)  # [L, V + T, d]
    tv_val, tv_test = tv[:, : len(val_q)], tv[:, len(val_q):]
    zs_val = _encode(model, [zero_shot_prompt(q, prefix) for q in val_q])
    tg_val = answer_token_ids(model, [y for _, y in split.val])
    sweep = intervene_sweep(model, zs_val, tv_val, list(range(L)), max_rows=max_rows)
    val_curve = first_token_correct(sweep.top1, tg_val).float().mean(1)
    layer = int(val_curve.argmax())

    # test queries: baseline and task vector share one greedy decoding (the patched copies are the
    # second half of the batch), ICL uses the cached one; the first generated token is the top-1 prediction
    zs = _encode(model, [zero_shot_prompt(q, prefix) for q in test_q] * 2)
    tg = answer_token_ids(model, [y for _, y in split.test])
    n_tokens = max(len(model.tokenizer(" " + y, add_special_tokens=False)["input_ids"]) for _, y in split.test) + 1
    T = len(test_q)
    both = greedy_tokens(model, zs, n_tokens, layer=layer, vectors=tv_test[layer], patch_rows=range(T, 2 * T))
    icl = cached_greedy_tokens(model, icl_test, n_tokens)
    ids = {"baseline": both[:T], "task vector": both[T:], "ICL": icl}
    first = {c: first_token_correct(torch.tensor([r[0] for r in rs]), tg) for c, rs in ids.items()}
    gens = {c: [model.tokenizer.decode(r) for r in rs] for c, rs in ids.items()}
    greedy = {c: torch.tensor([greedy_match(g, y) for g, (_, y) in zip(gs, split.test)]) for c, gs in gens.items()}
    return TaskVectorRun(split.task, val_curve, layer, first, greedy, gens, split.test, icl_test[0])


@dataclasses.dataclass
class FunctionVectorRun:
    """One task through Todd et al.'s protocol (:func:`run_function_vector`).

    * ``effects``: ``[L, H]`` average indirect effect of each head on shuffled-label prompts
    * ``heads``: all heads ranked by effect, best first
    * ``val_grid``: ``[len(n_heads), L]`` validation accuracy of adding the FV built from the top
      ``n_heads[i]`` heads after layer ``l`` to zero-shot prompts
    * ``n_heads``, ``layer``: the setting chosen on validation; ``correct``: ``[N_TEST]`` bool there
    * ``shuffled_acc``: first-token accuracy on the shuffled-label prompts themselves
    """

    task: str
    effects: torch.Tensor
    heads: list
    n_heads_grid: list
    val_grid: torch.Tensor
    n_heads: int
    layer: int
    correct: torch.Tensor
    fv_norm: float
    shuffled_acc: float


def run_function_vector(model, split, k: int, n_clean: int, n_corrupted: int, n_heads_grid, seed: int = 0,
                        prefix: str = "", max_rows: int = 256) -> FunctionVectorRun:
    """Todd et al.'s function vector for one task split.

    Mean head outputs come from ``n_clean`` ICL prompts whose queries are drawn from the
    demonstration pool; head effects from ``n_corrupted`` prompts with shuffled labels (also from
    the pool, so validation and test queries are never seen). For each size in ``n_heads_grid``
    the FV (sum of the top heads' mean contributions) is added after each layer to the zero-shot
    validation prompts; the best (size, layer) is then scored on the test prompts (first token).
    """
    import random

    from lmbook.data.tasks import (answer_token_ids, few_shot_prompts, first_token_correct,
                        shuffled_few_shot_prompts, zero_shot_prompt)

    rng = random.Random(f"{seed}:fv:{split.task}")
    pool = list(split.demos)
    clean_q = [rng.choice(pool)[0] for _ in range(n_clean)]
    cor_pairs = [rng.choice(pool) for _ in range(n_corrupted)]
    clean = _encode(model, few_shot_prompts(pool, clean_q, k, seed=seed + 2, prefix=prefix))
    contrib = head_contributions(model, clean)
    mean_z, mean_heads = contrib["z"].mean(1), contrib["heads"].mean(1)
    cor = _encode(model, shuffled_few_shot_prompts(pool, [x for x, _ in cor_pairs], k, seed=seed + 3, prefix=prefix))
    cor_tg = answer_token_ids(model, [y for _, y in cor_pairs])
    shuffled_acc = float(first_token_correct(next_token(model, cor).top1[0], cor_tg).float().mean())
    effects = head_patch_effects(model, cor, mean_z, cor_tg, max_rows=max_rows)
    ranked = top_heads(effects, effects.numel())
    L = model.num_layers
    zs_val = _encode(model, [zero_shot_prompt(x, prefix) for x, _ in split.val])
    tg_val = answer_token_ids(model, [y for _, y in split.val])
    grid = list(n_heads_grid)
    fvs = torch.stack([function_vector(mean_heads, ranked[:n]) for n in grid])  # [K, d]
    vecs = fvs[:, None].expand(-1, L, -1).reshape(len(grid) * L, -1)
    sweep = intervene_sweep(model, zs_val, vecs, list(range(L)) * len(grid), mode="add", max_rows=max_rows)
    val_grid = first_token_correct(sweep.top1, tg_val).float().mean(1).view(len(grid), L)
    best = int(val_grid.flatten().argmax())
    ki, layer = divmod(best, L)
    zs_test = _encode(model, [zero_shot_prompt(x, prefix) for x, _ in split.test])
    tg_test = answer_token_ids(model, [y for _, y in split.test])
    test = intervene_sweep(model, zs_test, fvs[ki][None], [layer], mode="add")
    return FunctionVectorRun(split.task, effects, ranked, grid, val_grid, grid[ki], layer,
                             first_token_correct(test.top1[0], tg_test), float(fvs[ki].norm()), shuffled_acc)
