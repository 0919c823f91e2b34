"""Word2vec-style arithmetic in the residual stream (Merullo et al., 2023).

Introduced in chapter 7. On a one-shot prompt such as ::

    Q: What is the capital of France?
    A: Paris
    Q: What is the capital of Poland?
    A:

the logit lens at the last token often reads the *argument* (``Poland``) in middle layers and the
*answer* (``Warsaw``) from some layer on. Merullo et al. find that one MLP (FFN) makes the switch,
and that its output ``o`` at that layer works like a relation vector: ``Poland + o = Warsaw``, and
the same ``o`` turns ``China`` into ``Beijing`` in an unrelated context.

What a sublayer *writes* into the residual stream is read here, not nnterp's ``mlps_output``
alone: Gemma 2 and 3 normalise the MLP's output again (``post_feedforward_layernorm``) before
adding it, so the write is that norm's output; in pre-norm models it is ``mlps_output[l]``
(:func:`lmbook.mechanisms.sublayers.sublayer_writes`; ``residual before + attention write + MLP
write = residual after`` is tested in ``tests/test_sublayers.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from lmbook.core.params import ParameterError, check_int, check_layers
from lmbook.core.tokens import Batch, encode, first_token_ids
from lmbook.mechanisms.interventions import intervene_sweep
from lmbook.mechanisms.readout import lens_on_states, next_token, target_logits
from lmbook.mechanisms.sublayers import sublayer_writes

__all__ = [
    "one_shot_prompt",
    "copy_prompt",
    "LensPair",
    "lens_pair",
    "switch_layer",
    "distinct_first_tokens",
    "RelationLens",
    "RelationEdits",
    "transition_layer",
    "relation_lens",
    "relation_edits",
]


def one_shot_prompt(question: str, example: tuple[str, str], query: str) -> str:
    """Merullo et al.'s format: ``question`` holds ``{}`` for the input.

    >>> one_shot_prompt("What is the capital of {}?", ("France", "Paris"), "Poland")
    'Q: What is the capital of France?\\nA: Paris\\nQ: What is the capital of Poland?\\nA:'
    """
    if question.count("{}") != 1:
        raise ParameterError(f"the question template {question!r} must contain '{{}}' exactly once")
    x0, y0 = example
    return f"Q: {question.format(x0)}\nA: {y0}\nQ: {question.format(query)}\nA:"


def copy_prompt(word: str, filler: str = "table mug free", repeats: int = 2) -> str:
    """A context in which the next token is ``word`` by copying, with no relation in sight:
    ``"table mug free Poland table mug free Poland table mug free"`` (Merullo et al.'s demo)."""
    check_int("repeats", repeats, 1)
    return " ".join([f"{filler} {word}"] * repeats + [filler])


@dataclasses.dataclass
class LensPair:
    """Logit-lens readings of an argument token and an answer token at every layer, at each
    prompt's last token (``L`` layers, ``B`` prompts).

    * ``arg_lp``/``ans_lp``: ``[L, B]`` log-probabilities after each layer
    * ``top1``: ``[L, B]`` top-1 token after each layer
    * ``diff``/``mid_diff``: ``[L, B]`` answer logit minus argument logit after each layer /
      between its attention block and its MLP (what the MLP reads)
    * ``mlp``: ``[L, B, d]`` what each MLP writes, kept for building relation vectors
    * ``resid``: ``[L, B, d]`` the residual stream after each layer
    """

    arg_lp: torch.Tensor
    ans_lp: torch.Tensor
    top1: torch.Tensor
    diff: torch.Tensor
    mid_diff: torch.Tensor
    mlp: torch.Tensor
    resid: torch.Tensor


def lens_pair(model, batch: Batch, arg_ids: torch.Tensor, ans_ids: torch.Tensor) -> LensPair:
    """Read ``arg_ids`` and ``ans_ids`` (``[B]`` each) through the logit lens after every layer and
    between every layer's attention and MLP, at each prompt's last token."""
    w = sublayer_writes(model, batch)
    tg = torch.stack([torch.as_tensor(arg_ids), torch.as_tensor(ans_ids)], 1)
    lp, top = lens_on_states(model, w["resid"], tg)
    after = target_logits(model, w["resid"], tg)
    mid = target_logits(model, w["resid"] - w["mlp"], tg)
    return LensPair(lp[..., 0], lp[..., 1], top[..., 0], after[..., 1] - after[..., 0], mid[..., 1] - mid[..., 0],
                    w["mlp"], w["resid"])


def switch_layer(arg_lp: torch.Tensor, ans_lp: torch.Tensor, arg_top1: torch.Tensor | None = None) -> torch.Tensor:
    """First layer from which the answer outranks the argument through the last layer, provided
    the argument outranked the answer at some earlier layer; ``-1`` otherwise.

    ``arg_lp``/``ans_lp``: ``[L, B]`` (log-)probabilities by layer. With ``arg_top1`` (``[L, B]``
    bool: the argument is the reading's top-1 token), the argument counts as leading only where it
    is also top-1, so that two negligible probabilities in early layers do not make an "argument
    stage". Returns ``[B]``.
    """
    ahead = ans_lp > arg_lp  # [L, B]
    stays = ahead.flip(0).cumprod(0).flip(0).bool()  # ahead from l to the end
    L = ahead.shape[0]
    first = torch.where(stays.any(0), stays.float().argmax(0), torch.full((ahead.shape[1],), L))
    before = torch.arange(L)[:, None] < first[None]
    arg_leads = ~ahead if arg_top1 is None else (~ahead & arg_top1.bool())
    had_arg = (arg_leads & before).any(0)
    ok = stays.any(0) & had_arg
    return torch.where(ok, first, torch.full_like(first, -1))


def distinct_first_tokens(arg_ids: Sequence[int], ans_ids: Sequence[int]) -> torch.Tensor:
    """``[B]`` bool: the argument and the answer start with different tokens (only then can a
    reading tell them apart, e.g. not ``walk`` → ``walked`` where both start with `` walk``)."""
    return torch.as_tensor(arg_ids) != torch.as_tensor(ans_ids)


# ---------------------------------------------------------------- the chapter's protocol


@dataclasses.dataclass
class RelationLens:
    """One relation read through the logit lens on its one-shot prompts (:func:`relation_lens`).
    ``B`` = number of items.

    * ``items``: the ``(argument, answer)`` pairs probed (the one-shot example excluded);
      ``batch``: their prompts; ``arg``/``ans``: ``[B]`` first tokens of ``" " + argument/answer``
    * ``lens``: :class:`LensPair`
    * ``correct``/``distinct``/``switch``: ``[B]`` the model's top-1 answer is right; argument and
      answer start with different tokens; :func:`switch_layer` (``-1``: none)
    * ``usable``: ``[B]`` correct and distinct; ``across_mlp``: ``[B]`` at the switch layer the
      argument still leads *before* that layer's MLP (the MLP makes the switch)
    * ``layer``: the transition layer (:func:`transition_layer`, or the one given)
    """

    relation: str
    question: str
    example: tuple
    items: list
    batch: Batch
    arg: torch.Tensor
    ans: torch.Tensor
    lens: LensPair
    correct: torch.Tensor
    distinct: torch.Tensor
    switch: torch.Tensor
    usable: torch.Tensor
    across_mlp: torch.Tensor
    layer: int


@dataclasses.dataclass
class RelationEdits:
    """The edits of :func:`relation_edits` for one relation.

    * ``sources``/``evals``: item indices that build the vector / that it is tested on
      (``evals``: every other usable item); ``vector``: ``[d]`` the sources' mean MLP write at the layer
    * ``conditions``: ``{edit: {"reverted", "answer"}: [n_eval] bool}``: after the edit at the
      transition layer, the top-1 token is the argument / the answer
    * ``sweep``: ``{"remove", "swap"}: [L]`` answer rate when the edit is made after layer ``l``
      instead (first ``n_sweep`` eval items; the vector is then the sources' mean MLP write at ``l``)
    * ``copy_base``: ``[n_eval]`` the copy prompt's top-1 is the argument; ``copy``:
      ``{scale: {"vector", "random"}: [n_copy] bool}`` the answer is top-1 after adding
      ``scale * vector`` (or a random vector of the same norm) at the transition layer, over the
      items whose copy prompt copies; ``copy_sweep``: ``[L]`` the same at scale 1 after each layer
      (first ``n_sweep`` of them; NaN when none copies)
    """

    sources: list
    evals: list
    vector: torch.Tensor
    conditions: dict
    sweep: dict
    copy_base: torch.Tensor
    copy: dict
    copy_sweep: torch.Tensor


def transition_layer(switch: torch.Tensor, lens: LensPair, usable: torch.Tensor) -> int:
    """The most common switch layer among usable items that switch (ties: the earliest); if no
    item switches, the layer whose MLP most raises the answer's logit over the argument's."""
    s = switch[usable & (switch >= 0)]
    if len(s):
        return int(torch.bincount(s).argmax())
    gain = lens.diff - lens.mid_diff
    if usable.any():
        gain = gain[:, usable]
    return int(gain.mean(1).argmax())


def relation_lens(model, relation: str, pairs, question: str, prefix: str = "",
                  layer: int | None = None) -> RelationLens:
    """Merullo et al.'s first observation for one relation: the logit lens on one-shot prompts.

    ``pairs[0]`` is the one-shot example; every other pair is probed with :func:`one_shot_prompt`.
    """
    if len(pairs) < 2:
        raise ParameterError(f"relation {relation!r} needs at least two pairs (one example, one probe), "
                             f"got {len(pairs)}")
    example, items = tuple(pairs[0]), [tuple(p) for p in pairs[1:]]
    batch = encode(model, [prefix + one_shot_prompt(question, example, x) for x, _ in items])
    arg = first_token_ids(model, [" " + x for x, _ in items])
    ans = first_token_ids(model, [" " + y for _, y in items])
    lens = lens_pair(model, batch, arg, ans)
    correct = lens.top1[-1] == ans
    distinct = distinct_first_tokens(arg, ans)
    switch = switch_layer(lens.arg_lp, lens.ans_lp, lens.top1 == arg[None])
    usable = correct & distinct
    at = switch.clamp(min=0)
    across = (switch >= 0) & (lens.mid_diff[at, torch.arange(len(items))] < 0)
    if layer is None:
        layer = transition_layer(switch, lens, usable)
    else:
        layer = check_layers("LAYER", layer, model.num_layers)[0]
    return RelationLens(relation, question, example, items, batch, arg, ans, lens, correct, distinct, switch,
                        usable, across, layer)


def relation_edits(model, rl: RelationLens, n_source: int, n_sweep: int, scales, seed: int = 0, prefix: str = "",
                   max_rows: int = 256) -> RelationEdits:
    """Merullo et al.'s interventions for one relation, at ``rl.layer`` (see :class:`RelationEdits`).

    The relation vector is the mean MLP write at the transition layer over ``n_source`` usable
    items that switch (fewer if fewer exist, always leaving one to test on). On the other usable
    items: remove the item's own MLP write; subtract the relation vector; swap the own write for
    the relation vector; swap it for a random vector of the same norm. Then, in a copy context
    where the next token is the argument itself, add (scaled) relation vectors.
    """
    import random


    check_int("n_source", n_source, 1)
    check_int("n_sweep", n_sweep, 1)
    L, items, arg, ans, mlp = model.num_layers, rl.items, rl.arg, rl.ans, rl.lens.mlp
    usable = [i for i in range(len(items)) if rl.usable[i]]
    if len(usable) < 2:
        raise ParameterError(
            f"relation {rl.relation!r}: the model answers only {len(usable)} of {len(items)} one-shot prompts "
            "correctly (with the argument and answer starting differently); at least 2 are needed"
        )
    switching = [i for i in usable if rl.switch[i] >= 0]
    candidates = switching if len(switching) >= 2 else usable
    rng = random.Random(f"{seed}:{rl.relation}")
    sources = sorted(rng.sample(candidates, min(n_source, len(candidates) - 1)))
    evals = [i for i in usable if i not in sources]
    layer = rl.layer
    vec = mlp[layer, sources].mean(0)
    ev = torch.tensor(evals, dtype=torch.long)
    own = mlp[layer, ev]  # [n, d]
    rand = torch.randn(vec.shape, generator=torch.Generator().manual_seed(seed))
    rand = rand / rand.norm() * vec.norm()
    edits = {
        "remove own MLP write": -own,
        "subtract relation vector": -vec.expand_as(own),
        "swap in relation vector": vec - own,
        "swap in random vector": rand - own,
    }
    eb = rl.batch.select(evals)
    r = intervene_sweep(model, eb, torch.stack(list(edits.values())), [layer] * len(edits), mode="add",
                        max_rows=max_rows)
    conditions = {name: {"reverted": r.top1[i] == arg[ev], "answer": r.top1[i] == ans[ev]}
                  for i, name in enumerate(edits)}

    sw = ev[:n_sweep]
    vl = mlp[:, sources].mean(1)  # [L, d]
    own_l = mlp[:, sw]  # [L, n, d]
    r = intervene_sweep(model, rl.batch.select(sw.tolist()), torch.cat([-own_l, vl[:, None] - own_l]),
                        list(range(L)) * 2, mode="add", max_rows=max_rows)
    hit = (r.top1 == ans[sw][None]).float().mean(1)
    sweep = {"remove": hit[:L], "swap": hit[L:]}

    cb = encode(model, [prefix + copy_prompt(items[i][0]) for i in evals])
    copy_base = next_token(model, cb).top1[0] == arg[ev]
    keep = [j for j in range(len(evals)) if copy_base[j]]
    copy, copy_sweep = {}, torch.full((L,), float("nan"))
    if keep:
        kb, ka = cb.select(keep), ans[ev][keep]
        scales = [float(s) for s in scales]
        vecs = torch.stack([s * vec for s in scales] + [s * rand for s in scales])
        r = intervene_sweep(model, kb, vecs, [layer] * len(vecs), mode="add", max_rows=max_rows)
        for i, s in enumerate(scales):
            copy[s] = {"vector": r.top1[i] == ka, "random": r.top1[len(scales) + i] == ka}
        m = min(n_sweep, len(keep))
        r = intervene_sweep(model, kb.select(list(range(m))), vec[None].expand(L, -1), list(range(L)), mode="add",
                            max_rows=max_rows)
        copy_sweep = (r.top1 == ka[:m][None]).float().mean(1)
    return RelationEdits(sources, evals, vec, conditions, sweep, copy_base, copy, copy_sweep)
