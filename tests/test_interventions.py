"""Interventions at positions and layers (lmbook.mechanisms.interventions) on tiny random models."""


import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode
from lmbook.experiments.refusal import encode_prompts, last_logprobs
from lmbook.mechanisms.interventions import ablated_residuals, hidden_states, intervene_sweep, patch_sweep, project_out
from lmbook.mechanisms.readout import next_token

from conftest import PROMPTS

TARGETS = torch.tensor([5, 6, 7])
HARMFUL = ["the eiffel tower is located in the city of", "michael jordan plays the sport of", "the capital of italy is"]


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


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_patching_a_state_into_its_own_prompt_changes_nothing(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS)
    own = hidden_states(model, b)  # [L, B, d]
    clean = next_token(model, b, TARGETS)
    r = intervene_sweep(model, b, own, range(model.num_layers), targets=TARGETS)
    assert r.top1.shape == (model.num_layers, len(PROMPTS))
    assert torch.equal(r.top1, clean.top1.expand_as(r.top1))
    torch.testing.assert_close(r.target_logprob, clean.target_logprob.expand_as(r.target_logprob), atol=1e-5, rtol=1e-5)
    zero = intervene_sweep(model, b, torch.zeros(model.num_layers, model.hidden_size), range(model.num_layers),
                           mode="add", targets=TARGETS)
    torch.testing.assert_close(zero.target_logprob, clean.target_logprob.expand_as(zero.target_logprob),
                               atol=1e-5, rtol=1e-5)


def test_batched_layer_sweep_equals_one_forward_per_layer(llama):
    b = encode(llama, PROMPTS)
    torch.manual_seed(0)
    vecs = torch.randn(llama.num_layers, llama.hidden_size)
    layers = [2, 0, 1]  # any order: rows follow the list, the trace follows the model
    swept = intervene_sweep(llama, b, vecs, layers, targets=TARGETS)
    chunked = intervene_sweep(llama, b, vecs, layers, targets=TARGETS, max_rows=1)
    torch.testing.assert_close(chunked.target_logprob, swept.target_logprob, atol=1e-5, rtol=1e-5)
    for i, layer in enumerate(layers):
        with torch.no_grad(), llama.trace(b.inputs()):
            llama.layers_output[layer][b.rows(), b.last] = vecs[i]
            ref = llama.logits[b.rows(), b.last].log_softmax(-1).save()
        torch.testing.assert_close(swept.target_logprob[i], ref[b.rows(), TARGETS], atol=1e-5, rtol=1e-5)
        assert torch.equal(swept.top1[i], ref.argmax(-1))
    assert not torch.allclose(swept.target_logprob[0], next_token(llama, b, TARGETS).target_logprob[0])


def test_add_equals_replace_with_the_sum(llama):
    b = encode(llama, PROMPTS)
    own = hidden_states(llama, b)
    v = torch.randn(llama.num_layers, llama.hidden_size)
    added = intervene_sweep(llama, b, v, range(llama.num_layers), mode="add", targets=TARGETS)
    replaced = intervene_sweep(llama, b, own + v[:, None], range(llama.num_layers), targets=TARGETS)
    torch.testing.assert_close(added.target_logprob, replaced.target_logprob, atol=1e-4, rtol=1e-4)


def test_sweep_checks_its_arguments(llama):
    b = encode(llama, PROMPTS)
    with pytest.raises(ParameterError, match="out of range"):
        intervene_sweep(llama, b, torch.zeros(1, llama.hidden_size), [3])
    with pytest.raises(ParameterError, match="vectors must be"):
        intervene_sweep(llama, b, torch.zeros(2, llama.hidden_size), [0])
    with pytest.raises(ParameterError, match="mode="):
        intervene_sweep(llama, b, torch.zeros(1, llama.hidden_size), [0], mode="swap")


def test_project_out():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    r = torch.randn(8)
    r = r / r.norm()
    out = project_out(h, r)
    assert (out @ r).abs().max() < 1e-5
    torch.testing.assert_close(project_out(out, r), out)
    per_row = torch.stack([r, torch.zeros(8)])
    out2 = project_out(h, per_row)
    torch.testing.assert_close(out2[0], out[0])
    assert torch.equal(out2[1], h[1]), "a zero direction leaves its row exactly unchanged"


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_ablation_leaves_the_residual_stream_orthogonal(tiny_models, family):
    model = tiny_models[family]
    batch = encode_prompts(model, HARMFUL, fmt="plain")
    torch.manual_seed(1)
    r = torch.randn(model.hidden_size)
    res = ablated_residuals(model, batch, r)  # [L + 1, B, T, d]
    assert res.shape[:2] == (model.num_layers + 1, len(HARMFUL))
    r = r / r.norm()
    scale = res.norm(dim=-1).max()
    assert (res @ r).abs().max() < 1e-5 * scale
    # without ablation the stream has a component along r
    plain = hidden_states(model, batch, None, batch.last)
    assert (plain @ r).abs().max() > 1e-3


def test_zero_interventions_change_nothing(llama):
    batch = encode_prompts(llama, HARMFUL, fmt="plain")
    base = last_logprobs(llama, batch)
    d = llama.hidden_size
    r = torch.randn(d)
    ablate = torch.stack([torch.zeros(d), r, torch.zeros(d)])
    lp = last_logprobs(llama, batch, ablate=ablate, add={1: torch.zeros(3, d)})
    torch.testing.assert_close(lp[[0, 2]], base[[0, 2]], rtol=0, atol=1e-6)
    assert not torch.allclose(lp[1], base[1])


def test_addition_equals_adding_to_the_hidden_state(llama):
    """Adding v after the last layer shifts the final hidden state by v at every position."""
    batch = encode_prompts(llama, HARMFUL[:1], fmt="plain")
    v = torch.randn(llama.hidden_size)
    lp = last_logprobs(llama, batch, add={2: v})
    h = hidden_states(llama, batch, [2])[0, 0]
    hf = llama._model
    ref = hf.lm_head(hf.model.norm(h + v)).log_softmax(-1)
    torch.testing.assert_close(lp[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gptj"])
def test_orthogonalized_weights_equal_the_runtime_ablation(family, tiny_models):
    """Arditi et al.'s weight edit computes what directional ablation computes at run time, and the
    weights (including tied embeddings) are exactly restored afterwards."""
    from lmbook.mechanisms.interventions import orthogonalized_weights
    from lmbook.mechanisms.readout import next_token_logprobs

    model = tiny_models[family]
    b = encode_prompts(model, HARMFUL, fmt="plain")
    r = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model._model.state_dict().items()}
    runtime = last_logprobs(model, b, ablate=r)
    with orthogonalized_weights(model, r):
        edited = next_token_logprobs(model, b)
    torch.testing.assert_close(edited, runtime, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(edited, next_token_logprobs(model, b), atol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model._model.state_dict().items())


def test_orthogonalized_weights_refuse_post_sublayer_norms(tiny_models):
    from lmbook.mechanisms.interventions import orthogonalized_weights

    model = tiny_models["gemma3"]
    with pytest.raises(ParameterError, match="post-sublayer norms"):
        with orthogonalized_weights(model, torch.ones(model.hidden_size)):
            pass
