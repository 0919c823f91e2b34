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

What would make a swap that keeps the answer mean less than it seems, and what the protocol does
about it: the transition layer and the vector are chosen on a *selection* half of the prompts
and every edit is scored on the other half (:func:`split_items`); the swap is compared prompt by
prompt with removing the write alone and with swapping in another relation's vector of the same
norm (:func:`lmbook.core.stats.paired_difference`); and the copy-context test is run both as one addition at the
last token and as the demo's replacement of the MLP write at every position of a band of late
layers (:func:`demo_band`, :func:`lmbook.mechanisms.interventions.mlp_write_sweep`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

import torch

from lmbook.core.params import ParameterError, check_float, check_int, check_layers
from lmbook.core.tokens import Batch, encode, first_token_ids
from lmbook.mechanisms.interventions import intervene_sweep, mlp_write_sweep
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
    "split_items",
    "transition_layer",
    "relation_lens",
    "relation_sources",
    "relation_vectors",
    "demo_band",
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

# Merullo et al.'s demo replaces the FFN output of GPT-2 Medium's layers 18 to 23 (of 24) at every
# position with the relation vector: from three quarters of the depth to the last layer.
DEMO_BAND = (18, 24)


def demo_band(n_layers: int) -> list[int]:
    """The layers at the relative depth of Merullo et al.'s demo band (GPT-2 Medium's 18..23
    of 24): from ``round(18 / 24 * n_layers)`` to the last layer.

    >>> demo_band(24), demo_band(18)
    ([18, 19, 20, 21, 22, 23], [14, 15, 16, 17])
    """
    check_int("n_layers", n_layers, 1)
    first = min(n_layers - 1, math.floor(DEMO_BAND[0] / DEMO_BAND[1] * n_layers + 0.5))
    return list(range(first, n_layers))


def split_items(n: int, seed: int, relation: str = "", share: float = 0.5) -> tuple[list[int], list[int]]:
    """Split items ``0..n-1`` at random (seeded by ``seed`` and ``relation``) into a
    *selection* set, on which the transition layer is chosen and the relation vector built,
    and a disjoint *report* set, on which every edit is scored. ``share``: the selection's
    share of the items (at least one item in each set)."""
    check_int("n", n, 2)
    share = check_float("share", share, 0.0, 1.0)
    idx = list(range(n))
    random.Random(f"{seed}:{relation}:split").shuffle(idx)
    k = min(n - 1, max(1, math.floor(share * n + 0.5)))
    return sorted(idx[:k]), sorted(idx[k:])


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
    * ``layer``: the transition layer (:func:`transition_layer` on the selection items only, or
      the one given); ``how``: ``"switch"`` (the most common switch layer), ``"gain"`` (no
      selection item switches: the MLP that most raises the answer) or ``"given"``
    * ``select``/``report``: item indices of :func:`split_items`: the layer and the relation
      vector come from ``select``; every edit is scored on ``report``
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
    how: str = "switch"
    select: list = dataclasses.field(default_factory=list)
    report: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RelationEdits:
    """The edits of :func:`relation_edits` for one relation.

    * ``sources``/``evals``: item indices that build the vector (usable selection items) / that
      it is tested on (usable report items); ``vector``: ``[d]`` the sources' mean MLP write at
      the layer
    * ``conditions``: ``{edit: {"reverted", "answer"}: [n_eval] bool}``: after the edit at the
      transition layer, the top-1 token is the argument / the answer; every condition is scored
      on the same prompts in the same order, so two conditions compare prompt by prompt
    * ``cross``: ``{other relation: edit name}`` of the cross-relation swaps in ``conditions``
    * ``sweep``: ``{"remove", "swap"}: [L]`` answer rate when the edit is made after layer ``l``
      instead (first ``n_sweep`` eval items; the vector is then the sources' mean MLP write at ``l``)
    * ``copy_base``: ``[n_eval]`` the copy prompt's top-1 is the argument; ``copy``:
      ``{scale: {"vector", "random"}: [n_copy] bool}`` the answer is top-1 after adding
      ``scale * vector`` (or a random vector of the same norm) at the last token after the
      transition layer, over the items whose copy prompt copies; ``copy_band``: the same when
      the MLP write of every layer in ``band`` is replaced at every position by the scaled
      vector (Merullo et al.'s demo); ``"any"``/``"any_random"``: the top-1 is the answer of
      *some* item of the relation (a capital, not necessarily this country's); ``copy_sweep``:
      ``[L]`` the last-token addition at scale 1
      after each layer (first ``n_sweep`` of them; NaN when none copies)
    """

    sources: list
    evals: list
    vector: torch.Tensor
    conditions: dict
    sweep: dict
    copy_base: torch.Tensor
    copy: dict
    copy_sweep: torch.Tensor
    cross: dict = dataclasses.field(default_factory=dict)
    band: list = dataclasses.field(default_factory=list)
    copy_band: dict = dataclasses.field(default_factory=dict)


def transition_layer(switch: torch.Tensor, lens: LensPair, usable: torch.Tensor) -> int:
    """The most common switch layer among usable items that switch (ties: the earliest); if no
    item switches, the layer whose MLP most raises the answer's logit over the argument's.
    Only the items where ``usable`` holds are read (pass the selection set's)."""
    s = switch[usable & (switch >= 0)]
    if len(s):
        return int(torch.bincount(s).argmax())
    gain = lens.diff - lens.mid_diff
    if usable.any():
        gain = gain[:, usable]
    return int(gain.mean(1).argmax())


def relation_lens(model, relation: str, pairs, question: str, prefix: str = "",
                  layer: int | None = None, seed: int = 0, select_share: float = 0.5) -> RelationLens:
    """Merullo et al.'s first observation for one relation: the logit lens on one-shot prompts.

    ``pairs[0]`` is the one-shot example; every other pair is probed with :func:`one_shot_prompt`.
    The items are split by :func:`split_items`; the transition layer is chosen on the
    selection items alone, so the report items it is then tested on never inform it.
    """
    if len(pairs) < 3:
        raise ParameterError(f"relation {relation!r} needs at least three pairs (one example, one probe to "
                             f"choose on, one to report on), got {len(pairs)}")
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
    select, report = split_items(len(items), seed, relation, select_share)
    in_select = torch.zeros(len(items), dtype=torch.bool)
    in_select[select] = True
    if layer is None:
        how = "switch" if (usable & in_select & (switch >= 0)).any() else "gain"
        layer = transition_layer(switch, lens, usable & in_select)
    else:
        how, layer = "given", check_layers("LAYER", layer, model.num_layers)[0]
    return RelationLens(relation, question, example, items, batch, arg, ans, lens, correct, distinct, switch,
                        usable, across, layer, how, select, report)


def relation_sources(rl: RelationLens, n_source: int, seed: int = 0) -> list[int]:
    """Up to ``n_source`` usable *selection* items, drawn with the seed, that build the relation
    vector: among those that switch, or among all usable selection items if fewer than two switch."""
    check_int("n_source", n_source, 1)
    usable = [i for i in rl.select if rl.usable[i]]
    if not usable:
        raise ParameterError(
            f"relation {rl.relation!r}: none of the {len(rl.select)} selection prompts is answered correctly "
            "(with the argument and answer starting differently); at least 1 is needed to build the vector"
        )
    switching = [i for i in usable if rl.switch[i] >= 0]
    candidates = switching if len(switching) >= 2 else usable
    rng = random.Random(f"{seed}:{rl.relation}")
    return sorted(rng.sample(candidates, min(n_source, len(candidates))))


def relation_vectors(rl: RelationLens, sources: Sequence[int]) -> torch.Tensor:
    """``[L, d]``: the mean MLP write at the last token over ``sources``, at every layer."""
    return rl.lens.mlp[:, list(sources)].mean(1)


def relation_edits(model, rl: RelationLens, n_source: int, n_sweep: int, scales, seed: int = 0, prefix: str = "",
                   max_rows: int = 256, others: dict | None = None) -> RelationEdits:
    """Merullo et al.'s interventions for one relation, at ``rl.layer`` (see :class:`RelationEdits`).

    The relation vector is the mean MLP write at the transition layer over the
    :func:`relation_sources` (selection items). On the usable report items: remove the item's own
    MLP write; subtract the relation vector; swap the own write for the relation vector; swap it
    for a random vector of the same norm; and, for each ``others[name]`` (``[d]``: another
    relation's vector at *this* relation's layer), swap it for that vector rescaled to the
    relation vector's norm (the cross-relation control: only the direction differs). All of them
    are one batched forward. Then, in a copy context where the next token is the argument itself,
    add (scaled) relation vectors at the last token, and replace the MLP writes at every position
    of :func:`demo_band` with them.
    """
    check_int("n_sweep", n_sweep, 1)
    L, items, arg, ans, mlp = model.num_layers, rl.items, rl.arg, rl.ans, rl.lens.mlp
    sources = relation_sources(rl, n_source, seed)
    evals = [i for i in rl.report if rl.usable[i]]
    if not evals:
        raise ParameterError(
            f"relation {rl.relation!r}: the model answers none of the {len(rl.report)} report prompts correctly "
            "(with the argument and answer starting differently); at least 1 is needed to test the vector on"
        )
    layer = rl.layer
    vl = relation_vectors(rl, sources)  # [L, d]
    vec = vl[layer]
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
    cross = {}
    for name, other in (others or {}).items():
        other = torch.as_tensor(other).float()
        if other.shape != vec.shape:
            raise ParameterError(f"others[{name!r}] must be one vector [d={vec.shape[0]}], got {tuple(other.shape)}")
        cross[name] = f"swap in {name} vector"
        edits[cross[name]] = other / other.norm().clamp_min(1e-12) * vec.norm() - own
    r = intervene_sweep(model, rl.batch.select(evals), torch.stack(list(edits.values())), [layer] * len(edits),
                        mode="add", max_rows=max_rows)
    conditions = {name: {"reverted": r.top1[i] == arg[ev], "answer": r.top1[i] == ans[ev]}
                  for i, name in enumerate(edits)}

    sw = ev[:n_sweep]
    own_l = mlp[:, sw]  # [L, n, d]
    r = intervene_sweep(model, rl.batch.select(sw.tolist()), torch.cat([-own_l, vl[:, None] - own_l]),
                        list(range(L)) * 2, mode="add", max_rows=max_rows)
    hit = (r.top1 == ans[sw][None]).float().mean(1)
    sweep = {"remove": hit[:L], "swap": hit[L:]}

    cb = encode(model, [prefix + copy_prompt(items[i][0]) for i in evals])
    copy_base = next_token(model, cb).top1[0] == arg[ev]
    keep = [j for j in range(len(evals)) if copy_base[j]]
    band = demo_band(L)
    copy, copy_band, copy_sweep = {}, {}, torch.full((L,), float("nan"))
    if keep:
        kb, ka = cb.select(keep), ans[ev][keep]
        scales = [float(s) for s in scales]
        vecs = torch.stack([s * vec for s in scales] + [s * rand for s in scales])
        r = intervene_sweep(model, kb, vecs, [layer] * len(vecs), mode="add", max_rows=max_rows)
        rb = mlp_write_sweep(model, kb, vecs, [band] * len(vecs), mode="replace", max_rows=max_rows)
        n, answers = len(scales), torch.unique(ans)  # any answer of the relation's items
        for i, s in enumerate(scales):
            for out, res in ((copy, r), (copy_band, rb)):
                out[s] = {"vector": res.top1[i] == ka, "random": res.top1[n + i] == ka,
                          "any": torch.isin(res.top1[i], answers),
                          "any_random": torch.isin(res.top1[n + i], answers)}
        m = min(n_sweep, len(keep))
        r = intervene_sweep(model, kb.select(list(range(m))), vec[None].expand(L, -1), list(range(L)), mode="add",
                            max_rows=max_rows)
        copy_sweep = (r.top1 == ka[:m][None]).float().mean(1)
    return RelationEdits(sources, evals, vec, conditions, sweep, copy_base, copy, copy_sweep, cross, band, copy_band)
