"""Sublayer writes, the logit lens on given states, and switch layers (lmbook.experiments.arithmetic, chapter 7)."""

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


def test_relation_edits_end_to_end(llama):
    import dataclasses

    from lmbook.experiments.arithmetic import relation_edits, relation_lens

    words = ["paris", "rome", "france", "italy", "red", "blue", "green", "one", "two", "three", "city", "tower"]
    pairs = list(zip(words[::2], words[1::2]))
    rl = relation_lens(llama, "toy", pairs, "capital of {} is", layer=1)
    assert rl.layer == 1 and len(rl.items) == len(pairs) - 1
    assert rl.lens.arg_lp.shape == (llama.num_layers, len(rl.items))
    # a random model answers nothing: pretend it answers everything to exercise the edits
    with pytest.raises(ParameterError, match="at least 2 are needed"):
        relation_edits(llama, dataclasses.replace(rl, usable=torch.zeros(len(rl.items), dtype=torch.bool)), 1, 2, [1])
    fake = dataclasses.replace(rl, usable=torch.ones(len(rl.items), dtype=torch.bool))
    ed = relation_edits(llama, fake, n_source=2, n_sweep=2, scales=[1, 2])
    assert len(ed.sources) == 2 and sorted(ed.sources + ed.evals) == list(range(len(rl.items)))
    assert set(ed.conditions) == {"remove own MLP write", "subtract relation vector", "swap in relation vector",
                                  "swap in random vector"}
    assert ed.sweep["swap"].shape == (llama.num_layers,)
    # removing the own MLP write at the last token equals zeroing the MLP output there
    b = rl.batch.select(ed.evals)
    with torch.no_grad(), llama.trace(b.inputs()):
        llama.mlps_output[1][b.rows(), b.last] = 0.0
        top = llama.logits[b.rows(), b.last].argmax(-1).save()
    assert torch.equal(ed.conditions["remove own MLP write"]["reverted"], top == rl.arg[ed.evals])
    assert torch.equal(ed.conditions["remove own MLP write"]["answer"], top == rl.ans[ed.evals])
