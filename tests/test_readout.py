"""Reading the residual stream through the unembedding (lmbook.mechanisms.readout) on tiny random models."""


import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode
from lmbook.mechanisms.readout import (
    emergence_layer,
    final_logits,
    lens_on_states,
    logit_lens,
    next_token_logprobs,
    promoted_tokens,
    target_logits,
    unembed,
)
from lmbook.mechanisms.sublayers import sublayer_writes

from conftest import PROMPTS
from tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_at_last_layer_is_the_models_output(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS)
    targets = torch.tensor([5, 6, 7])
    r = logit_lens(model, b, targets=targets, k=3)
    lp = next_token_logprobs(model, b)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_last_only_logits_equal_full_logits(family, tiny_models):
    from lmbook.core.models import trace

    model = tiny_models[family]
    b = encode(model, PROMPTS)
    with torch.no_grad(), trace(model, b):
        full = final_logits(model, b).save()
    with torch.no_grad(), trace(model, b, last_only=True):
        part = final_logits(model, b, last_only=True).save()
    assert part.shape == (len(PROMPTS), model.vocab_size)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)


def test_unembed_equals_the_models_logits(llama):
    b = encode(llama, PROMPTS)
    with torch.no_grad(), llama.trace(b.inputs()):
        h = llama.ln_final.output[b.rows(), b.last].save()
        ref = llama.logits[b.rows(), b.last].save()
    torch.testing.assert_close(unembed(llama, h, chunk=2), ref, atol=1e-5, rtol=1e-5)


def test_promoted_tokens_reads_a_direction_through_the_unembedding(llama):
    tok = llama.tokenizer
    target = tok.convert_tokens_to_ids("paris")
    # a direction along the unembedding row of "paris" promotes "paris" first
    w = llama._model.lm_head.weight
    d = w[target] * 50 - w.mean(0) * 50
    assert promoted_tokens(llama, d, k=3)[0] == "paris"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lens_on_states_equals_the_logit_lens(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS)
    w = sublayer_writes(model, b)
    tg = torch.tensor([[5, 6], [7, 8], [9, 10]])
    lp, top = lens_on_states(model, w["resid"], tg, k=2)
    ref = logit_lens(model, b, targets=tg, k=2)
    torch.testing.assert_close(lp, ref.target_logprobs[:, :, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(top, ref.top_ids[:, :, 0])
    # target logits alone give the same differences between targets
    lg = target_logits(model, w["resid"], tg)
    torch.testing.assert_close(lg[..., 1] - lg[..., 0], lp[..., 1] - lp[..., 0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ParameterError, match="targets must be"):
        lens_on_states(model, w["resid"], tg[:2])
