"""Unit tests of lmbook.mechanisms.training (chapter 5) on tiny random models (each test loads its own copy,
since fine-tuning changes the weights)."""

import pytest
import torch

from lmbook import ParameterError
from lmbook.mechanisms.training import attach_lora, finetune, reply_loss, tokenize_pairs
from lmbook.core.models import load_model
from lmbook.experiments.refusal import encode_prompts, last_logprobs

PAIRS = [("the capital of italy is", " rome"), ("the eiffel tower is in", " paris"),
         ("michael jordan plays", " basketball"), ("she speaks", " french")]


@pytest.fixture
def fresh(tiny_dirs):
    return lambda family="llama": load_model(str(tiny_dirs[family]), device="cpu")


def test_tokenize_pairs_masks_the_prompt(llama):
    (ids, labels), = tokenize_pairs(llama.tokenizer, [("the city of", " paris")], add_special_tokens=True, end=" <eos>")
    assert len(ids) == len(labels) == 6  # <bos> the city of | paris <eos>
    assert labels[:4] == [-100] * 4 and labels[4:] == ids[4:]


def test_lora_starts_as_the_model_and_merges_exactly(fresh):
    model = fresh()
    batch = encode_prompts(model, ["the capital of italy is"], "plain")
    base = last_logprobs(model, batch)
    lora = attach_lora(model, [0, 2], rank=2, seed=0)
    assert torch.equal(last_logprobs(model, batch), base), "B = 0: the adapters add nothing at first"
    with torch.no_grad():
        for B in lora.B:
            B.normal_()
    hooked = last_logprobs(model, batch)
    assert not torch.allclose(hooked, base)
    lora.merge()
    torch.testing.assert_close(last_logprobs(model, batch), hooked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "layers"])
def test_finetune_lowers_the_reply_loss(fresh, method):
    model = fresh("llama")
    before = reply_loss(model, PAIRS, add_special_tokens=True)
    weights = {n: p.clone() for n, p in model._model.named_parameters()}
    res = finetune(model, PAIRS, method=method, layers=[1, 2], steps=15, batch_size=2, lr=1e-2 if method == "lora" else 3e-3,
                   rank=4, add_special_tokens=True, progress=False)
    after = reply_loss(model, PAIRS, add_special_tokens=True)
    assert len(res.losses) == 15 and res.trained > 0
    assert after < before - 0.5
    changed = {n for n, p in model._model.named_parameters() if not torch.equal(p, weights[n])}
    assert changed and all(".layers.1." in n or ".layers.2." in n for n in changed), changed
    assert not any(p.requires_grad for p in model._model.parameters()), "everything is frozen again"


def test_finetune_on_gemma_family(fresh):
    model = fresh("gemma3")
    before = reply_loss(model, PAIRS, add_special_tokens=True)
    finetune(model, PAIRS, steps=10, batch_size=4, lr=1e-2, add_special_tokens=True, progress=False)
    assert reply_loss(model, PAIRS, add_special_tokens=True) < before


def test_bad_arguments(llama):
    with pytest.raises(ParameterError):
        finetune(llama, PAIRS, method="full", steps=1)
    with pytest.raises(ParameterError):
        finetune(llama, [], steps=1)
    with pytest.raises(ParameterError, match="out of range"):
        finetune(llama, PAIRS, layers=[9], steps=1)
