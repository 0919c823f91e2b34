"""Logit lens and activation patching on tiny random models."""

import pytest
import torch

from conftest import PROMPTS
from lmbook import ParameterError
from lmbook.mechanisms.readout import emergence_layer, logit_lens
from lmbook.mechanisms.interventions import hidden_states, last_token_logprobs, patch_sweep, sublayer_norms
from lmbook.core.tokens import encode
from tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_at_last_layer_is_the_models_output(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS)
    targets = torch.tensor([5, 6, 7])
    r = logit_lens(model, b, targets=targets, k=3)
    lp = last_token_logprobs(model, b)
    assert r.target_logprobs.shape == (model.num_layers, 3, 1, 3)
    torch.testing.assert_close(r.target_logprobs[-1, :, 0], lp[:, targets], atol=1e-5, rtol=1e-5)
    top = lp.topk(3, dim=-1)
    assert torch.equal(r.top_ids[-1, :, 0], top.indices)
    torch.testing.assert_close(r.top_probs[-1, :, 0], top.values.exp(), atol=1e-6, rtol=1e-5)


def test_batched_lens_equals_one_prompt_at_a_time(llama):
    b = encode(llama, PROMPTS)
    r = logit_lens(llama, b, positions="all", k=2)
    for i in range(len(PROMPTS)):
        one = logit_lens(llama, b.select([i]), positions="all", k=2)
        n = int(b.last[i]) + 1
        torch.testing.assert_close(r.top_probs[:, i, :n], one.top_probs[:, 0, :n], atol=1e-5, rtol=1e-5)
        assert torch.equal(r.top_ids[:, i, :n], one.top_ids[:, 0, :n])
    assert (r.positions[0, int(b.last[0]) + 1:] == -1).all()


def test_lens_subset_of_layers(llama):
    b = encode(llama, PROMPTS[:1])
    full = logit_lens(llama, b, k=1)
    part = logit_lens(llama, b, layers=[2, 0], k=1)
    assert part.layers == [0, 2]
    torch.testing.assert_close(part.top_probs, full.top_probs[[0, 2]])


def test_lens_rejects_out_of_range_layers(llama):
    b = encode(llama, PROMPTS[:1])
    with pytest.raises(ParameterError, match="out of range.*3 layers"):
        logit_lens(llama, b, layers=[3])


def test_emergence_layer():
    top = torch.tensor([[1, 2, 3], [9, 2, 3], [1, 2, 0], [1, 2, 3]])  # [L=4, B=3]
    tgt = torch.tensor([1, 2, 3])
    # row 0: top at layers 0, 2, 3 -> stays from 2; row 1: always; row 2: breaks at 2, back at 3
    assert emergence_layer(top, tgt, [0, 1, 2, 3]).tolist() == [2, 0, 3]
    assert emergence_layer(top, torch.tensor([5, 5, 5]), [0, 1, 2, 3]).tolist() == [-1, -1, -1]
    assert emergence_layer(top, tgt, [10, 11, 12, 13]).tolist() == [12, 10, 13]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patching_a_prompt_into_itself_changes_nothing(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS[:1])
    lp = patch_sweep(model, b, b)
    for row in lp[1:]:
        torch.testing.assert_close(row, lp[0], atol=1e-5, rtol=1e-5)


def test_batched_patch_sweep_equals_one_forward_per_layer(llama):
    src, tgt = encode(llama, PROMPTS[1:2]), encode(llama, PROMPTS[2:3])
    lp = patch_sweep(llama, src, tgt, source_pos=2, target_pos=1)
    states = hidden_states(llama, src, positions=torch.tensor([2]))
    assert not torch.allclose(lp[1], lp[0]), "patching a different prompt should change the output"
    for layer in range(llama.num_layers):
        with torch.no_grad(), llama.trace(tgt.inputs()):
            llama.layers_output[layer][0, 1] = states[layer, 0]
            one = llama.logits[0, -1].log_softmax(-1).save()
        torch.testing.assert_close(lp[layer + 1], one, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        clean = llama._model(**tgt.inputs()).logits[0, -1].log_softmax(-1)
    torch.testing.assert_close(lp[0], clean, atol=1e-5, rtol=1e-5)


def test_patch_positions_are_checked(llama):
    b = encode(llama, PROMPTS[:1])
    with pytest.raises(ParameterError, match="target_pos=99"):
        patch_sweep(llama, b, b, target_pos=99)
    with pytest.raises(ParameterError, match="one source prompt"):
        patch_sweep(llama, encode(llama, PROMPTS), b)


def test_sublayer_norms_match_a_plain_forward(llama):
    b = encode(llama, PROMPTS)
    norms = sublayer_norms(llama, b, row=1)
    n = int(b.last[1]) + 1
    with torch.no_grad():
        ref = llama._model(**b.inputs(), output_hidden_states=True)
    assert norms["residual"].shape == (llama.num_layers, n)
    for layer in range(llama.num_layers - 1):
        torch.testing.assert_close(norms["residual"][layer], ref.hidden_states[layer + 1][1, :n].norm(dim=-1))
    assert (norms["attention"] > 0).all() and (norms["mlp"] > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_last_only_logits_equal_full_logits(family, tiny_models):
    from lmbook.core.models import trace
    from lmbook.mechanisms.readout import final_logits

    model = tiny_models[family]
    b = encode(model, PROMPTS)
    with torch.no_grad(), trace(model, b):
        full = final_logits(model, b).save()
    with torch.no_grad(), trace(model, b, last_only=True):
        part = final_logits(model, b, last_only=True).save()
    assert part.shape == (len(PROMPTS), model.vocab_size)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
