"""Sublayer writes, the logit lens on given states, and switch layers (lmbook.experiments.arithmetic, chapter 7)."""

import dataclasses

import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode
from lmbook.experiments.arithmetic import (
    copy_prompt,
    distinct_first_tokens,
    lens_pair,
    one_shot_prompt,
    switch_layer,
)
from lmbook.mechanisms.readout import target_logits
from lmbook.mechanisms.sublayers import sublayer_writes

from conftest import PROMPTS

TARGETS = torch.tensor([5, 6, 7])


def test_prompts():
    assert one_shot_prompt("What is the capital of {}?", ("France", "Paris"), "Poland") == (
        "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"
    )
    assert copy_prompt("China") == "table mug free China table mug free China table mug free"
    with pytest.raises(ParameterError, match="exactly once"):
        one_shot_prompt("What is the capital?", ("a", "b"), "c")






def test_lens_pair_mid_is_before_the_mlp(llama):
    b = encode(llama, PROMPTS)
    arg, ans = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
    r = lens_pair(llama, b, arg, ans)
    w = sublayer_writes(llama, b)
    mid = target_logits(llama, w["resid"] - w["mlp"], torch.stack([arg, ans], 1))
    torch.testing.assert_close(r.mid_diff, mid[..., 1] - mid[..., 0])
    torch.testing.assert_close(r.diff, r.ans_lp - r.arg_lp, atol=1e-4, rtol=1e-4)
    assert r.mlp.shape == (llama.num_layers, 3, llama.hidden_size)


def test_switch_layer_on_fixed_readings():
    # layers x prompts; columns: argument first then answer from layer 2 on; answer always ahead
    # (no argument stage); answer ahead at 1, behind at 2, ahead again from 3; answer never ahead.
    arg = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.5], [0.5, 0.0, 0.5, 0.5], [0.1, 0.0, 0.1, 0.5]])
    ans = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.1, 1.0, 0.6, 0.1], [0.6, 1.0, 0.1, 0.1], [0.9, 1.0, 0.9, 0.1]])
    assert switch_layer(arg, ans).tolist() == [2, -1, 3, -1]
    # counting only layers where the argument is the top-1 token: column 0's argument is top-1 at
    # layer 1 (a real argument stage); column 2's only at layer 0, where it merely ties the answer
    top1 = torch.zeros(4, 4, dtype=torch.bool)
    top1[1, 0] = top1[0, 2] = True
    assert switch_layer(arg, ans, top1).tolist() == [2, -1, 3, -1]
    top1[0, 2], top1[2, 2] = False, True
    assert switch_layer(arg, ans, top1).tolist() == [2, -1, 3, -1]
    top1[2, 2] = False
    assert switch_layer(arg, ans, top1).tolist() == [2, -1, -1, -1]


def test_distinct_first_tokens():
    assert distinct_first_tokens([1, 2, 3], [1, 5, 3]).tolist() == [False, True, False]


def test_split_items_is_disjoint_seeded_and_covers_everything():
    from lmbook.experiments.arithmetic import split_items

    for n in (2, 3, 8, 71):
        sel, rep = split_items(n, seed=0, relation="r")
        assert sel and rep and not set(sel) & set(rep) and sorted(sel + rep) == list(range(n))
        assert (sel, rep) == split_items(n, seed=0, relation="r")
    assert split_items(71, 0, "r") != split_items(71, 1, "r")
    assert len(split_items(10, 0, share=0.3)[0]) == 3
    with pytest.raises(ParameterError, match="share=2"):
        split_items(10, 0, share=2)


def test_demo_band():
    from lmbook.experiments.arithmetic import demo_band

    assert demo_band(24) == [18, 19, 20, 21, 22, 23]  # the demo's own band in GPT-2 Medium
    assert demo_band(18) == [14, 15, 16, 17] and demo_band(30)[0] == 23 and demo_band(1) == [0]


WORDS = ["paris", "rome", "france", "italy", "red", "blue", "green", "one", "two", "three", "city", "tower",
         "a", "b", "c", "d", "e", "f"]


def _toy_lens(model, **kw):
    from lmbook.experiments.arithmetic import relation_lens

    pairs = list(zip(WORDS[::2], WORDS[1::2]))
    return relation_lens(model, "toy", pairs, "capital of {} is", **kw)


def test_held_out_selection_never_sees_its_report_prompts(llama):
    """The transition layer and the relation vector come from the selection items only: whatever the
    report items read, the layer and the sources stay the same, and every edit is scored on report items."""
    from lmbook.experiments.arithmetic import relation_sources

    rl = _toy_lens(llama, seed=3)
    assert rl.how in ("switch", "gain") and not set(rl.select) & set(rl.report)
    assert sorted(rl.select + rl.report) == list(range(len(rl.items)))
    n, L = len(rl.items), llama.num_layers
    usable = torch.ones(n, dtype=torch.bool)
    # selection items switch at layer 1; report items at layer 2, and there are more of them
    switch = torch.full((n,), 2)
    switch[rl.select] = 1
    rl = dataclasses.replace(rl, usable=usable, switch=switch)
    from lmbook.experiments.arithmetic import transition_layer

    sel = torch.zeros(n, dtype=torch.bool)
    sel[rl.select] = True
    assert transition_layer(rl.switch, rl.lens, rl.usable & sel) == 1
    # scrambling every report item's readings changes neither the layer nor the sources
    lens2 = dataclasses.replace(rl.lens, diff=rl.lens.diff.clone(), mid_diff=rl.lens.mid_diff.clone(),
                                mlp=rl.lens.mlp.clone())
    lens2.diff[:, rl.report] = torch.randn(L, len(rl.report))
    lens2.mlp[:, rl.report] = torch.randn(L, len(rl.report), llama.hidden_size)
    switch2 = rl.switch.clone()
    switch2[rl.report] = 0
    rl2 = dataclasses.replace(rl, lens=lens2, switch=switch2)
    assert transition_layer(rl2.switch, rl2.lens, rl2.usable & sel) == 1
    assert relation_sources(rl, 3) == relation_sources(rl2, 3)
    assert set(relation_sources(rl, 3)) <= set(rl.select)
    # with no switch among the selection items, the fallback reads the selection items only too
    none = torch.full((n,), -1)
    g1 = transition_layer(none, rl.lens, rl.usable & sel)
    assert g1 == transition_layer(none, lens2, rl.usable & sel)


def test_relation_edits_end_to_end(llama):
    from lmbook.experiments.arithmetic import relation_edits, relation_vectors

    rl = _toy_lens(llama, layer=1)
    assert rl.layer == 1 and rl.how == "given" and len(rl.items) == len(WORDS) // 2 - 1
    assert rl.lens.arg_lp.shape == (llama.num_layers, len(rl.items))
    # a random model answers nothing: pretend it answers everything to exercise the edits
    with pytest.raises(ParameterError, match="at least 1 is needed"):
        relation_edits(llama, dataclasses.replace(rl, usable=torch.zeros(len(rl.items), dtype=torch.bool)), 1, 2, [1])
    fake = dataclasses.replace(rl, usable=torch.ones(len(rl.items), dtype=torch.bool))
    other = torch.randn(llama.hidden_size, generator=torch.Generator().manual_seed(1))
    ed = relation_edits(llama, fake, n_source=2, n_sweep=2, scales=[1, 2], others={"other": other})
    assert len(ed.sources) == 2 and set(ed.sources) <= set(rl.select) and ed.evals == rl.report
    assert set(ed.conditions) == {"remove own MLP write", "subtract relation vector", "swap in relation vector",
                                  "swap in random vector", "swap in other vector"}
    assert ed.cross == {"other": "swap in other vector"}
    assert ed.sweep["swap"].shape == (llama.num_layers,)
    torch.testing.assert_close(ed.vector, relation_vectors(fake, ed.sources)[1])
    # removing the own MLP write at the last token equals zeroing the MLP output there
    b = rl.batch.select(ed.evals)
    with torch.no_grad(), llama.trace(b.inputs()):
        llama.mlps_output[1][b.rows(), b.last] = 0.0
        top = llama.logits[b.rows(), b.last].argmax(-1).save()
    assert torch.equal(ed.conditions["remove own MLP write"]["reverted"], top == rl.arg[ed.evals])
    assert torch.equal(ed.conditions["remove own MLP write"]["answer"], top == rl.ans[ed.evals])
    # the copy context: both variants cover every scale, on the same prompts
    assert ed.band and set(ed.copy) == set(ed.copy_band) == ({1.0, 2.0} if ed.copy else set())


def test_swap_minus_remove_of_the_vector_with_itself_is_zero(llama):
    """The cross-relation swap of a relation's own vector (any norm: it is rescaled) is the own swap,
    prompt by prompt; and swapping a prompt's own write in for itself is the clean run."""
    from lmbook.experiments.arithmetic import relation_edits
    from lmbook.mechanisms.interventions import intervene_sweep
    from lmbook.mechanisms.readout import next_token

    rl = _toy_lens(llama, layer=1)
    fake = dataclasses.replace(rl, usable=torch.ones(len(rl.items), dtype=torch.bool))
    first = relation_edits(llama, fake, n_source=2, n_sweep=1, scales=[1])
    ed = relation_edits(llama, fake, n_source=2, n_sweep=1, scales=[1], others={"self": 3.0 * first.vector})
    own, same = ed.conditions["swap in relation vector"], ed.conditions["swap in self vector"]
    for what in ("answer", "reverted"):
        assert (own[what].float() - same[what].float()).abs().sum() == 0
    b = rl.batch.select(ed.evals)
    own_write = rl.lens.mlp[1, ed.evals]
    r = intervene_sweep(llama, b, (own_write - own_write)[None], [1], mode="add")
    assert torch.equal(r.top1, next_token(llama, b).top1)


# ---------------------------------------------------------------- MLP writes at every position (mlp_write_sweep)


def _mlp_module(model, layer):
    """The torch module whose output is the MLP's write (Gemma's post-feedforward norm)."""
    from lmbook.mechanisms.sublayers import post_norms

    norms = post_norms(model, layer)
    return norms[1] if norms is not None else model.layers[layer]._module.mlp


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_replacing_the_mlp_write_by_itself_changes_nothing(family, tiny_models):
    from lmbook.mechanisms.interventions import mlp_write_sweep
    from lmbook.mechanisms.readout import next_token

    model = tiny_models[family]
    b = encode(model, ["the", "capital"], start=True)
    assert b.last.tolist() == [1, 1]  # one position besides the sink: the last token's own write is all there is
    own = sublayer_writes(model, b)["mlp"]  # [L, B, d]
    L = model.num_layers
    clean = next_token(model, b, TARGETS[:2])
    r = mlp_write_sweep(model, b, own, [[l] for l in range(L)], targets=TARGETS[:2])
    assert torch.equal(r.top1, clean.top1.expand_as(r.top1))
    torch.testing.assert_close(r.target_logprob, clean.target_logprob.expand_as(r.target_logprob), atol=1e-5, rtol=1e-5)
    # adding zero at every position of longer prompts changes nothing either
    b = encode(model, PROMPTS, start=True)
    clean = next_token(model, b, TARGETS)
    r = mlp_write_sweep(model, b, torch.zeros(2, model.hidden_size), [[0, 1], list(range(L))], mode="add",
                        targets=TARGETS)
    torch.testing.assert_close(r.target_logprob, clean.target_logprob.expand_as(r.target_logprob), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_mlp_write_sweep_equals_a_hooked_forward(family, tiny_models):
    from lmbook.mechanisms.interventions import mlp_write_sweep

    model = tiny_models[family]
    b = encode(model, PROMPTS, start=True)
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(3, model.hidden_size, generator=g)
    bands = [[1], [1, 2], []]
    for mode in ("replace", "add"):
        r = mlp_write_sweep(model, b, vecs, bands, mode=mode, targets=TARGETS)
        for i, band in enumerate(bands):
            def hook(module, inputs, out, v=vecs[i]):
                out = out.clone()
                for row, last in enumerate(b.last.tolist()):  # positions 1..last, never the sink
                    out[row, 1:last + 1] = v + (out[row, 1:last + 1] if mode == "add" else 0)
                return out
            handles = [_mlp_module(model, layer).register_forward_hook(hook) for layer in band]
            try:
                with torch.no_grad():
                    logits = model._model(**b.inputs()).logits[b.rows(), b.last].float()
            finally:
                for h in handles:
                    h.remove()
            lp = logits.log_softmax(-1)[torch.arange(3), TARGETS]
            torch.testing.assert_close(r.target_logprob[i], lp, atol=1e-4, rtol=1e-4)
            assert torch.equal(r.top1[i], logits.argmax(-1))


def test_mlp_write_sweep_checks_its_arguments(llama):
    from lmbook.mechanisms.interventions import mlp_write_sweep

    b = encode(llama, PROMPTS)
    with pytest.raises(ParameterError, match="mode='swap'"):
        mlp_write_sweep(llama, b, torch.zeros(1, llama.hidden_size), [[0]], mode="swap")
    with pytest.raises(ParameterError, match="vectors must be"):
        mlp_write_sweep(llama, b, torch.zeros(2, llama.hidden_size), [[0]])
    with pytest.raises(ParameterError, match="bands"):
        mlp_write_sweep(llama, b, torch.zeros(1, llama.hidden_size), [[99]])




