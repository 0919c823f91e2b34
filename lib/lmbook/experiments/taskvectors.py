"""Task vectors (Hendel et al., 2023) and function vectors (Todd et al., 2024).

Introduced in chapter 6. Both claim that in-context learning compresses the demonstrations into a
vector at the last token, which can be cut out of one prompt and put into another:

* a **task vector** is the residual stream after layer ``l`` at the last token of few-shot prompts
  (averaged over a few); *patching* it over the same state of a zero-shot prompt ``"x →"`` should
  make the model answer ``f(x)`` (:func:`task_vectors`,
  :func:`lmbook.mechanisms.interventions.intervene_sweep` with ``mode="replace"``);
* a **function vector** is the sum of the mean outputs of the few attention heads whose outputs most
  restore the answer on prompts with shuffled labels; it is *added* to the residual stream
  (:func:`lmbook.mechanisms.sublayers.head_contributions`, :func:`head_patch_effects`, :func:`function_vector`).

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
up exactly to what the attention block writes (:func:`lmbook.mechanisms.sublayers.head_contributions`, tested in
``tests/test_sublayers.py``).
"""

from __future__ import annotations

import dataclasses

import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int, check_layers
from lmbook.core.tokens import Batch, answer_token_ids, encode
from lmbook.mechanisms.generation import greedy_tokens
from lmbook.mechanisms.interventions import hidden_states, intervene_sweep, last_token_inputs, prefix_cache
from lmbook.mechanisms.readout import Readings, next_token, readings
from lmbook.mechanisms.sublayers import head_contributions, out_projection

__all__ = [
    "task_vectors",
    "head_patch_effects",
    "top_heads",
    "function_vector",
    "TaskVectorRun",
    "validation_sweep",
    "run_task_vectors",
    "sweep_precision",
    "FunctionVectorRun",
    "task_head_effects",
    "run_function_vectors",
]


# ---------------------------------------------------------------- task vectors (Hendel et al.)


def task_vectors(model, batch: Batch, layers=None, group: int | None = None) -> torch.Tensor:
    """Mean of the residual stream after each layer at the prompts' last token.

    ``group=None``: the mean over all prompts of ``batch``, ``[L, d]`` (``L`` = number of
    ``layers``, default all). ``group=n``: means over consecutive groups of ``n`` prompts (the
    dummy-query prompts of one demonstration set), ``[L, len(batch) // n, d]``."""
    h = hidden_states(model, batch, layers)  # [L, B, d]
    if group is None:
        return h.mean(1)
    check_int("group", group, 1)
    if len(batch) % group:
        raise ParameterError(f"a batch of {len(batch)} prompts does not split into groups of {group}")
    return h.view(h.shape[0], len(batch) // group, group, h.shape[-1]).mean(2)


# ---------------------------------------------------------------- function vectors (Todd et al.)




def head_patch_effects(
    model,
    batch: Batch,
    mean_z: torch.Tensor,
    targets: torch.Tensor,
    layers=None,
    max_rows: int = 256,
) -> torch.Tensor:
    """Causal effect of each head's mean output on prompts that do not show the task.

    ``batch``: prompts with shuffled labels; ``mean_z``: ``[L, H, hd]`` each head's mean
    input to the output projection on clean prompts (for ``layers``, default all);
    ``targets``: ``[B]`` the correct answers' token ids. For each head, its slice of the
    output projection's input at the last token is replaced by the mean, and the effect
    is the probability of the target after the patch minus without it, averaged over the
    prompts (Todd et al.'s average indirect effect). One batched row per (head, prompt),
    at most ``max_rows`` rows a forward; the prompts' tokens before the last run once
    (a key-value cache) and each row runs its last token only. Returns ``[L, H]``."""
    layers = sorted(set(check_layers("layers", layers, model.num_layers)))
    H = model.num_heads
    if mean_z.shape[:2] != (len(layers), H):
        raise ParameterError(f"mean_z must be [L={len(layers)}, H={H}, head_dim], "
                             f"got {tuple(mean_z.shape)}")
    hd = mean_z.shape[-1]
    tg = torch.as_tensor(targets, dtype=torch.long)
    B = len(batch)
    lb, cache = prefix_cache(model, batch)  # the shared prefix, run once
    names = {l: out_projection(model, l)[0] for l in layers}
    units = [None] + [(i, h) for i in range(len(layers)) for h in range(H)]
    per = max(1, max_rows // B)
    p = []
    for start in range(0, len(units), per):
        chunk = units[start:start + per]  # None: the unpatched prompts
        inputs = last_token_inputs(model, lb, cache, len(chunk))
        with torch.no_grad(), trace(model, inputs, logits_to_keep=1):
            for j, unit in enumerate(chunk):  # units are ordered by layer
                if unit is None:
                    continue
                i, h = unit
                if j == 0 or chunk[j - 1] is None or chunk[j - 1][0] != i:
                    z = getattr(model.attentions[layers[i]], names[layers[i]]).input
                m = mean_z[i, h].to(device=z.device, dtype=z.dtype)
                z[j * B:(j + 1) * B, -1, h * hd:(h + 1) * hd] = m
            hf = model.ln_final.output[:, -1].save()
        lp = readings(model, hf, tg.repeat(len(chunk)))[1]
        p.append(lp.exp().view(len(chunk), B))
    p = torch.cat(p)  # [1 + L * H, B]
    return (p[1:] - p[0]).mean(1).view(len(layers), H)


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


def validation_sweep(model, split, k: int, n_dummy: int, seed: int = 0, prefix: str = "",
                     max_rows: int = 256) -> Readings:
    """Hendel et al.'s layer sweep on the validation queries of one task split.

    For every query, ``k`` demonstrations are drawn from ``split.demos`` and its task vector is the
    last-token residual stream of ``n_dummy`` prompts with those demonstrations and a dummy query,
    averaged; it replaces the residual stream after every layer at the arrow of the zero-shot prompt
    ``"query →"`` (one batched sweep). The draws depend only on ``seed`` and the order of the
    queries, so the first ``n`` queries get the same prompts as in a run over all of them. Returns
    :class:`lmbook.mechanisms.readout.Readings` ``[L, V]``: the top-1 token and the log-probability
    of the answer's first token."""
    from lmbook.data.tasks import task_vector_prompts, zero_shot_prompt

    val_q = [x for x, _ in split.val]
    _, dummy = task_vector_prompts(split.demos, val_q, k, n_dummy, seed=seed, prefix=prefix)
    tv = task_vectors(model, encode(model, dummy), group=n_dummy)  # [L, V, d]
    zs = encode(model, [zero_shot_prompt(q, prefix) for q in val_q])
    tg = answer_token_ids(model, [y for _, y in split.val])
    return intervene_sweep(model, zs, tv, list(range(model.num_layers)), targets=tg, max_rows=max_rows)


def run_task_vectors(model, split, k: int, n_dummy: int, seed: int = 0, prefix: str = "",
                     max_rows: int = 256, fast=None) -> TaskVectorRun:
    """Zero-shot baseline, in-context (ICL) and task-vector accuracy for one task split.

    The validation queries go through :func:`validation_sweep`, on ``fast`` where given (a
    lower-precision copy of ``model`` from :func:`lmbook.core.models.load_copy`); the layer with the
    best validation accuracy is the only one used on the test queries, whose task vectors are drawn
    the same way (``seed + 1``) and, like the greedy decoding, computed on ``model`` (no comparison
    measures what a copy would change in decoded text). The ICL prompt is a query's demonstrations
    and the query. Scores: first-token match, and on the test queries also greedy multi-token match.
    """
    from lmbook.data.tasks import (
        first_token_correct,
        greedy_match,
        task_vector_prompts,
        zero_shot_prompt,
    )

    test_q = [x for x, _ in split.test]
    sweeper = model if fast is None else fast  # an nnsight model has no truth value
    sweep = validation_sweep(sweeper, split, k, n_dummy, seed=seed, prefix=prefix, max_rows=max_rows)
    tg_val = answer_token_ids(model, [y for _, y in split.val])
    val_curve = first_token_correct(sweep.top1, tg_val).float().mean(1)
    layer = int(val_curve.argmax())
    icl_test, dummy_test = task_vector_prompts(split.demos, test_q, k, n_dummy, seed=seed + 1, prefix=prefix)
    tv_test = task_vectors(model, encode(model, dummy_test), layers=[layer], group=n_dummy)[0]  # [T, d]

    # test queries: baseline and task vector share one greedy decoding (the patched copies are the
    # second half of the batch), ICL uses the cached one; the first generated token is the top-1 prediction
    zs = encode(model, [zero_shot_prompt(q, prefix) for q in test_q] * 2)
    tg = answer_token_ids(model, [y for _, y in split.test])
    n_tokens = max(len(model.tokenizer(" " + y, add_special_tokens=False)["input_ids"]) for _, y in split.test) + 1
    T = len(test_q)
    both = greedy_tokens(model, zs, n_tokens, layer=layer, vectors=tv_test, patch_rows=range(T, 2 * T))
    icl = greedy_tokens(model, encode(model, icl_test), n_tokens)
    ids = {"baseline": both[:T], "task vector": both[T:], "ICL": icl}
    first = {c: first_token_correct(torch.tensor([r[0] for r in rs]), tg) for c, rs in ids.items()}
    gens = {c: [model.tokenizer.decode(r) for r in rs] for c, rs in ids.items()}
    greedy = {c: torch.tensor([greedy_match(g, y) for g, (_, y) in zip(gs, split.test)]) for c, gs in gens.items()}
    return TaskVectorRun(split.task, val_curve, layer, first, greedy, gens, split.test, icl_test[0])


def sweep_precision(exact, fast, splits: dict, k: int, n_dummy: int, n: int, seed: int = 0, prefix: str = "",
                    max_rows: int = 256) -> dict:
    """How much running the task-vector layer sweep on a lower-precision copy of the model (``fast``,
    say a bfloat16 copy from :func:`lmbook.core.models.load_copy`) changes it, against ``exact`` (the
    float32 model): :func:`validation_sweep` on the first ``n`` validation queries of every split of
    ``splits`` (``{task: TaskSplit}``), with the same prompts on both models. Over the ``n_queries``
    queries compared, pooled over tasks:

    * ``agreement``: the share of patched prompts (every layer, every query) whose top-1 token is the
      same on both models;
    * ``curve_exact`` / ``curve_fast``: ``[L]`` first-token accuracy by patched layer;
      ``max_difference``: the largest absolute difference between the two curves;
    * ``prob_difference``: the largest absolute difference, over layers, of the mean probability of
      the answer's first token;
    * ``layer_exact`` / ``layer_fast``: the best layer of each pooled curve (the earliest on ties)."""
    from lmbook.data.tasks import first_token_correct

    check_int("n", n, 1)
    if not splits:
        raise ParameterError("sweep_precision needs at least one task split")
    same, correct, prob = [], {"exact": [], "fast": []}, {"exact": [], "fast": []}
    for split in splits.values():
        sub = dataclasses.replace(split, val=split.val[:n])
        tg = answer_token_ids(exact, [y for _, y in sub.val])
        r = {name: validation_sweep(m, sub, k, n_dummy, seed=seed, prefix=prefix, max_rows=max_rows)
             for name, m in (("exact", exact), ("fast", fast))}
        same.append(r["exact"].top1 == r["fast"].top1)  # [L, n]
        for name, sw in r.items():
            correct[name].append(first_token_correct(sw.top1, tg))
            prob[name].append(sw.target_logprob.exp())
    same = torch.cat(same, 1)
    curve = {name: torch.cat(c, 1).float().mean(1) for name, c in correct.items()}
    p = {name: torch.cat(c, 1).mean(1) for name, c in prob.items()}
    return {"n_queries": same.shape[1], "agreement": float(same.float().mean()),
            "curve_exact": curve["exact"].tolist(), "curve_fast": curve["fast"].tolist(),
            "max_difference": float((curve["fast"] - curve["exact"]).abs().max()),
            "prob_difference": float((p["fast"] - p["exact"]).abs().max()),
            "layer_exact": int(curve["exact"].argmax()), "layer_fast": int(curve["fast"].argmax())}


@dataclasses.dataclass
class FunctionVectorRun:
    """One task through Todd et al.'s protocol (:func:`run_function_vectors`).

    * ``effects``: ``[L, H]`` average indirect effect of each head on this task's shuffled-label prompts
    * ``task_heads``: all heads ranked by this task's ``effects``, best first
    * ``heads``: all heads ranked by the effect averaged over ``ranked_over`` (the tasks run together),
      best first: the function vector sums the top ones (Todd et al.'s choice of heads)
    * ``val_grid``: ``[len(n_heads_grid), L]`` validation accuracy of adding the FV built from the top
      ``n_heads_grid[i]`` heads after layer ``l`` to zero-shot prompts
    * ``n_heads``, ``layer``: the setting chosen on validation; ``correct``: ``[N_TEST]`` bool there
    * ``shuffled_acc``: first-token accuracy on the shuffled-label prompts themselves
    """

    task: str
    effects: torch.Tensor
    task_heads: list
    heads: list
    ranked_over: list
    n_heads_grid: list
    val_grid: torch.Tensor
    n_heads: int
    layer: int
    correct: torch.Tensor
    fv_norm: float
    shuffled_acc: float


def task_head_effects(model, split, k: int, n_clean: int, n_corrupted: int, seed: int = 0, prefix: str = "",
                      max_rows: int = 256):
    """Todd et al.'s first step for one task split: each head's mean output and its causal effect.

    Mean head outputs come from ``n_clean`` ``k``-shot ICL prompts whose queries are drawn from the
    demonstration pool; head effects (:func:`head_patch_effects`) from ``n_corrupted`` ``k``-shot
    prompts with shuffled labels (also from the pool, so validation and test queries are never seen).
    Returns ``(effects [L, H], mean_heads [L, H, d], shuffled_acc)``."""
    import random

    from lmbook.data.tasks import few_shot_prompts, first_token_correct, shuffled_few_shot_prompts

    check_int("n_clean", n_clean, 1)
    check_int("n_corrupted", n_corrupted, 1)
    rng = random.Random(f"{seed}:fv:{split.task}")
    pool = list(split.demos)
    clean_q = [rng.choice(pool)[0] for _ in range(n_clean)]
    cor_pairs = [rng.choice(pool) for _ in range(n_corrupted)]
    clean = encode(model, few_shot_prompts(pool, clean_q, k, seed=seed + 2, prefix=prefix))
    contrib = head_contributions(model, clean)
    mean_z, mean_heads = contrib["z"].mean(1), contrib["heads"].mean(1)
    cor = encode(model, shuffled_few_shot_prompts(pool, [x for x, _ in cor_pairs], k, seed=seed + 3, prefix=prefix))
    cor_tg = answer_token_ids(model, [y for _, y in cor_pairs])
    shuffled_acc = float(first_token_correct(next_token(model, cor).top1[0], cor_tg).float().mean())
    effects = head_patch_effects(model, cor, mean_z, cor_tg, max_rows=max_rows)
    return effects, mean_heads, shuffled_acc


def run_function_vectors(model, splits: dict, k: int, n_clean: int, n_corrupted: int, n_heads_grid, seed: int = 0,
                         prefix: str = "", max_rows: int = 256) -> dict[str, FunctionVectorRun]:
    """Todd et al.'s function vectors for several task splits (``{task: TaskSplit}``).

    Each task's head effects and mean head outputs come from :func:`task_head_effects`; the heads
    are then ranked once, by the effect averaged over the tasks (Todd et al. choose one set of heads
    for all tasks), and each task's FV is the sum of *its own* mean outputs of the top heads. For
    each size in ``n_heads_grid`` the FV is added after each layer to the task's zero-shot
    validation prompts; the best (size, layer) is then scored on the test prompts (first token)."""
    from lmbook.data.tasks import first_token_correct, zero_shot_prompt

    if not splits:
        raise ParameterError("run_function_vectors needs at least one task split")
    grid = list(n_heads_grid)
    parts = {t: task_head_effects(model, sp, k, n_clean, n_corrupted, seed=seed, prefix=prefix, max_rows=max_rows)
             for t, sp in splits.items()}
    mean_effect = torch.stack([e for e, _, _ in parts.values()]).mean(0)
    ranked = top_heads(mean_effect, mean_effect.numel())
    L = model.num_layers
    runs = {}
    for t, split in splits.items():
        effects, mean_heads, shuffled_acc = parts[t]
        zs_val = encode(model, [zero_shot_prompt(x, prefix) for x, _ in split.val])
        tg_val = answer_token_ids(model, [y for _, y in split.val])
        fvs = torch.stack([function_vector(mean_heads, ranked[:n]) for n in grid])  # [K, d]
        vecs = fvs[:, None].expand(-1, L, -1).reshape(len(grid) * L, -1)
        sweep = intervene_sweep(model, zs_val, vecs, list(range(L)) * len(grid), mode="add", max_rows=max_rows)
        val_grid = first_token_correct(sweep.top1, tg_val).float().mean(1).view(len(grid), L)
        ki, layer = divmod(int(val_grid.flatten().argmax()), L)
        zs_test = encode(model, [zero_shot_prompt(x, prefix) for x, _ in split.test])
        tg_test = answer_token_ids(model, [y for _, y in split.test])
        test = intervene_sweep(model, zs_test, fvs[ki][None], [layer], mode="add")
        runs[t] = FunctionVectorRun(t, effects, top_heads(effects, effects.numel()), ranked, list(splits), grid,
                                    val_grid, grid[ki], layer, first_token_correct(test.top1[0], tg_test),
                                    float(fvs[ki].norm()), shuffled_acc)
    return runs
