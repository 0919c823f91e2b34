"""Task-vector patching, greedy decoding and per-head outputs on tiny random models (chapter 6)."""

import pytest
import torch

from conftest import PROMPTS
from lmbook import ParameterError
from lmbook.mechanisms.interventions import hidden_states
from lmbook.experiments.taskvectors import (
    function_vector,
    greedy_generate,
    head_contributions,
    head_patch_effects,
    intervene_sweep,
    next_token,
    out_projection,
    task_vectors,
    top_heads,
)
from lmbook.core.tokens import encode

TARGETS = torch.tensor([5, 6, 7])


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
    torch.testing.assert_close(zero.target_logprob, clean.target_logprob.expand_as(zero.target_logprob), atol=1e-5, rtol=1e-5)


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


def test_task_vector_is_the_mean_state(llama):
    b = encode(llama, PROMPTS)
    torch.testing.assert_close(task_vectors(llama, b, [0, 2]), hidden_states(llama, b, [0, 2]).mean(1))


def test_sweep_checks_its_arguments(llama):
    b = encode(llama, PROMPTS)
    with pytest.raises(ParameterError, match="out of range"):
        intervene_sweep(llama, b, torch.zeros(1, llama.hidden_size), [3])
    with pytest.raises(ParameterError, match="vectors must be"):
        intervene_sweep(llama, b, torch.zeros(2, llama.hidden_size), [0])
    with pytest.raises(ParameterError, match="mode="):
        intervene_sweep(llama, b, torch.zeros(1, llama.hidden_size), [0], mode="swap")


def test_greedy_generate_matches_hf_generate_and_own_patch(llama):
    b = encode(llama, PROMPTS)
    got = greedy_generate(llama, b, 3)
    for i, p in enumerate(PROMPTS):
        one = encode(llama, p)
        with torch.no_grad():
            out = llama._model.generate(**one.inputs(), max_new_tokens=3, do_sample=False, pad_token_id=1)
        assert got[i] == llama.tokenizer.decode(out[0, one.input_ids.shape[1]:])
    own = hidden_states(llama, b, [1])[0]
    assert greedy_generate(llama, b, 3, layer=1, vectors=own) == got
    moved = greedy_generate(llama, b, 3, layer=1, vectors=own[[1, 2, 0]])
    assert moved != got


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
def test_heads_add_up_to_the_attention_write(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS)
    c = head_contributions(model, b)
    L, B = model.num_layers, len(PROMPTS)
    assert c["heads"].shape == (L, B, model.num_heads, model.hidden_size)
    torch.testing.assert_close(c["heads"].sum(2) + c["bias"], c["attn"], atol=1e-5, rtol=1e-4)
    # the attention write, independently: what the layer adds before its MLP
    with torch.no_grad():
        out = model._model(**b.inputs(), output_hidden_states=True)
    # attention write + MLP write + residual before = residual after, at the last token
    with torch.no_grad(), model.trace(b.inputs()):
        mw = list().save()
        for layer in range(L):
            if getattr(model.layers[layer]._module, "post_feedforward_layernorm", None) is not None:
                mw.append(model.layers[layer].post_feedforward_layernorm.output[b.rows(), b.last])
            else:
                mw.append(model.mlps_output[layer][b.rows(), b.last])
    for layer in range(L - 1):  # the last hidden state HF returns is after the final norm
        before = out.hidden_states[layer][b.rows(), b.last]
        after = out.hidden_states[layer + 1][b.rows(), b.last]
        torch.testing.assert_close(before + c["attn"][layer] + mw[layer], after, atol=1e-4, rtol=1e-4)


def test_head_patch_effects(llama):
    b = encode(llama, PROMPTS)
    z = head_contributions(llama, b)["z"]  # [L, B, H, hd]
    one = b.select([0])
    # patching each head with its own value changes nothing
    eff = head_patch_effects(llama, one, z[:, 0], TARGETS[:1])
    assert eff.shape == (llama.num_layers, llama.num_heads)
    torch.testing.assert_close(eff, torch.zeros_like(eff), atol=1e-6, rtol=0)
    # a different prompt's head outputs: the batched effect equals a one-head forward
    mean_z = z[:, 1:].mean(1)
    eff = head_patch_effects(llama, b, mean_z, TARGETS, max_rows=7)
    assert eff.abs().sum() > 0
    name, _, _ = out_projection(llama, 1)
    hd = mean_z.shape[-1]
    base = next_token(llama, b, TARGETS).target_logprob[0].exp()
    with torch.no_grad(), llama.trace(b.inputs()):
        x = getattr(llama.attentions[1], name).input
        x[b.rows(), b.last, 2 * hd:3 * hd] = mean_z[1, 2]
        p = llama.logits[b.rows(), b.last].softmax(-1)[b.rows(), TARGETS].save()
    torch.testing.assert_close(eff[1, 2], (p - base).mean(), atol=1e-6, rtol=1e-5)


def test_top_heads_and_function_vector():
    eff = torch.tensor([[0.1, 0.5], [0.3, -1.0], [0.7, 0.0]])
    assert top_heads(eff, 2) == [(2, 0), (0, 1)]
    assert top_heads(eff, 2, layers=[4, 5, 6]) == [(6, 0), (4, 1)]
    heads = torch.arange(3 * 2 * 4, dtype=torch.float).view(3, 2, 4)
    torch.testing.assert_close(function_vector(heads, [(2, 0), (0, 1)]), heads[2, 0] + heads[0, 1])
    with pytest.raises(ParameterError):
        top_heads(eff, 7)


def test_protocols_run_end_to_end(llama, tmp_path):
    from lmbook.data.tasks import Task, split_task
    from lmbook.experiments.taskvectors import run_function_vector, run_task_vectors
    from tiny import WORDS

    words = [w for w in WORDS if w not in ("the", "a")]
    task = Task("shift", tuple((a, b) for a, b in zip(words[:30], words[1:31])), "test")
    split = split_task(task, n_val=4, n_test=5, min_demos=8, seed=0)
    r = run_task_vectors(llama, split, k=3, n_dummy=2, seed=0)
    assert r.val_curve.shape == (llama.num_layers,)
    assert r.layer == int(r.val_curve.argmax())
    assert set(r.greedy) == set(r.first_token) == {"baseline", "task vector", "ICL"}
    assert all(len(v) == 5 for v in r.first_token.values())
    fv = run_function_vector(llama, split, k=3, n_clean=4, n_corrupted=3, n_heads_grid=[1, 2], seed=0, max_rows=5)
    assert fv.effects.shape == (llama.num_layers, llama.num_heads)
    assert fv.val_grid.shape == (2, llama.num_layers)
    assert fv.n_heads in (1, 2) and 0 <= fv.layer < llama.num_layers
    assert float(fv.val_grid.max()) == float(fv.val_grid[[1, 2].index(fv.n_heads), fv.layer])
    assert len(fv.heads) == llama.num_layers * llama.num_heads


def test_greedy_patches_only_the_given_rows(llama):
    from lmbook.experiments.taskvectors import greedy_tokens

    b = encode(llama, PROMPTS)
    plain = greedy_tokens(llama, b, 2)
    own = hidden_states(llama, b, [0])[0]
    other = own[[2, 0, 1]]
    moved = greedy_tokens(llama, b, 2, layer=0, vectors=other[1:2], patch_rows=[1])
    everywhere = greedy_tokens(llama, b, 2, layer=0, vectors=other)
    assert moved[0] == plain[0] and moved[2] == plain[2]
    assert moved[1] == everywhere[1]
    assert [r[0] for r in plain] == next_token(llama, b).top1[0].tolist()


def test_unembed_equals_the_models_logits(llama):
    from lmbook.experiments.taskvectors import unembed

    b = encode(llama, PROMPTS)
    with torch.no_grad(), llama.trace(b.inputs()):
        h = llama.ln_final.output[b.rows(), b.last].save()
        ref = llama.logits[b.rows(), b.last].save()
    torch.testing.assert_close(unembed(llama, h, chunk=2), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_greedy_equals_uncached(family, tiny_models):
    from lmbook.experiments.taskvectors import cached_greedy_tokens, greedy_tokens

    model = tiny_models[family]
    b = encode(model, PROMPTS)
    assert cached_greedy_tokens(model, PROMPTS, 3) == greedy_tokens(model, b, 3)
