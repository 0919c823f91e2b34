"""Unit tests of lmbook.mechanisms.training (chapters 3 and 5) on tiny random models: the cached
frozen lower blocks, the AdamW loop both chapters train with, continued pretraining of the top
blocks, and the LoRA / layers fine-tune. Tests that train load their own copy of the model."""

import math

import pytest
import torch

from lmbook import ParameterError
from lmbook.core.models import load_model
from lmbook.core.tokens import encode
from lmbook.mechanisms.likelihood import encode_texts, logits_nll, token_nll
from lmbook.mechanisms.readout import next_token_logprobs
from lmbook.mechanisms.training import (
    adamw_loop,
    attach_lora,
    cached_last_top1,
    cached_nll,
    finetune,
    layer_modules,
    prefix_states,
    reply_loss,
    restore_after,
    shuffled_batches,
    skip_lower_layers,
    tokenize_pairs,
    top_layer_parameters,
    train_top_layers,
)

from tiny import FAMILIES

TEXTS = [
    "the eiffel tower is located in the city of paris",
    "michael jordan plays the sport of basketball and he was born in a big city",
    "the capital of italy is rome",
]
PAIRS = [("the capital of italy is", " rome"), ("the eiffel tower is in", " paris"),
         ("michael jordan plays", " basketball"), ("she speaks", " french")]


@pytest.fixture
def fresh(tiny_dirs, test_device):
    """A copy of a tiny model of its own, for tests that change the weights."""
    return lambda family="llama": load_model(str(tiny_dirs[family]), device=test_device, dtype=torch.float32)


def _device(model) -> torch.device:
    return next(model._model.parameters()).device


# ---------------------------------------------------------------- cached lower blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_lower_layers_give_the_full_models_losses(family, tiny_models):
    model = tiny_models[family]
    sc = encode_texts(model, TEXTS)
    full = token_nll(model, sc)
    for n_frozen in range(model.num_layers):
        states = prefix_states(model, sc, n_frozen)
        torch.testing.assert_close(cached_nll(model, sc, states, n_frozen, batch_size=2), full, atol=1e-5, rtol=1e-5)
        if n_frozen:
            nll, st = token_nll(model, sc, states_after=n_frozen - 1)
            torch.testing.assert_close(nll, full)
            torch.testing.assert_close(st, states)
    assert all(type(block).__name__ != "_CachedOutput" for block in layer_modules(model))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_cached_last_token_prediction_equals_the_full_model(family, tiny_models):
    """What chapter 3 uses to measure recall after training: the top-1 next token from cached states."""
    model = tiny_models[family]
    b = encode(model, TEXTS + ["the capital of"])
    full = next_token_logprobs(model, b).argmax(-1)
    for n_frozen in (0, 2):
        states = prefix_states(model, b, n_frozen)
        assert torch.equal(cached_last_top1(model, b, states, n_frozen, batch_size=2), full)


def test_skip_lower_layers_restores_the_blocks_after_an_error(llama):
    before = list(layer_modules(llama))
    with pytest.raises(RuntimeError):
        with skip_lower_layers(llama, 2):
            raise RuntimeError("boom")
    assert list(layer_modules(llama)) == before
    with pytest.raises(ParameterError, match="n_frozen"):
        with skip_lower_layers(llama, llama.num_layers):
            pass


def test_top_layer_parameters_are_the_top_blocks_and_the_final_norm(llama):
    params = top_layer_parameters(llama, 1)
    want = list(layer_modules(llama)[-1].parameters()) + list(llama.ln_final._module.parameters())
    assert [id(p) for p in params] == [id(p) for p in want]
    with pytest.raises(ParameterError, match="n_train_layers"):
        top_layer_parameters(llama, 0)


# ---------------------------------------------------------------- the AdamW loop


def test_shuffled_batches_by_epoch_and_by_step():
    by_epoch = shuffled_batches(5, 2, seed=3, epochs=2)
    gen = torch.Generator().manual_seed(3)
    want = []
    for _ in range(2):
        perm = torch.randperm(5, generator=gen).tolist()
        want += [perm[0:2], perm[2:4], perm[4:5]]
    assert by_epoch == want
    by_step = shuffled_batches(5, 2, seed=3, steps=4)  # a batch may straddle two passes
    gen = torch.Generator().manual_seed(3)
    stream = torch.randperm(5, generator=gen).tolist() + torch.randperm(5, generator=gen).tolist()
    assert by_step == [stream[0:2], stream[2:4], stream[4:6], stream[6:8]]
    assert shuffled_batches(2, 4, seed=0, steps=2)[0] in ([0, 1], [1, 0])  # fewer examples than a batch
    assert shuffled_batches(5, 2, seed=0, epochs=0) == []
    with pytest.raises(ParameterError, match="exactly one"):
        shuffled_batches(5, 2, seed=0)


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_one_adamw_step_equals_the_hand_computed_step(max_grad_norm):
    """First AdamW step, no weight decay: m/(1-b1) = g, sqrt(v/(1-b2)) = |g|, so p -= lr g / (|g| + eps),
    after clipping g to max_grad_norm."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    target = torch.tensor([0.0, 1.0, -1.0])
    g = 2 * (w.detach() - target)
    if max_grad_norm is not None:
        g = g * min(1.0, max_grad_norm / (float(g.norm()) + 1e-6))
    want = w.detach() - 0.1 * g / (g.abs() + 1e-8)
    seen = []
    losses = adamw_loop([w], [[0]], lambda rows: ((w - target) ** 2).sum(), lr=0.1, max_grad_norm=max_grad_norm,
                        on_step=seen.append, progress=False)
    torch.testing.assert_close(w.detach(), want)
    assert losses == [pytest.approx(float(((torch.tensor([1.0, -2.0, 3.0]) - target) ** 2).sum()))] and seen == [1]
    assert w.grad is None


def test_adamw_loop_follows_the_learning_rate_schedule():
    """The first AdamW step moves each weight by lr (sign of the gradient); with a schedule, by lr * factor(0)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    adamw_loop([w], [[0]], lambda rows: (w ** 2).sum(), lr=0.1, lr_factor=lambda i: 0.25, progress=False)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0 - 0.025, -2.0 + 0.025]))
    factors = []
    v = torch.nn.Parameter(torch.tensor([1.0]))
    adamw_loop([v], [[0]] * 4, lambda rows: (v ** 2).sum(), lr=0.1, lr_factor=lambda i: factors.append(i) or 1.0,
               progress=False)
    assert factors == [0, 1, 2, 3]  # asked once per step, counting from 0


def test_mixed_precision_training_and_caching_stay_close_to_float32(llama):
    """bf16=True: the cached lower states are close to float32's, and training still lowers the loss."""
    train = encode_texts(llama, TEXTS)
    k = 1
    n_frozen = llama.num_layers - k
    st32, st16 = prefix_states(llama, train, n_frozen), prefix_states(llama, train, n_frozen, bf16=True)
    assert st16.dtype == torch.float32 and (st16 - st32).abs().max() < 0.1 * st32.abs().max()
    before = float(cached_nll(llama, train, st32, n_frozen).sum())
    with restore_after(top_layer_parameters(llama, k)):
        losses = train_top_layers(llama, train, st16, n_train_layers=k, lr=1e-2, epochs=3, batch_size=2, warmup=1,
                                  schedule="cosine", bf16=True, progress=False)
        after = float(cached_nll(llama, train, st32, n_frozen).sum())
    assert len(losses) == 6 and after < before


def test_one_top_layer_step_equals_a_step_on_the_full_model(fresh):
    """Training on cached lower-block states takes the step that training the full model would."""
    model = fresh()
    train = encode_texts(model, TEXTS)
    k, lr = 2, 1e-2
    n_frozen = model.num_layers - k
    params = top_layer_parameters(model, k)
    before = [p.detach().clone() for p in params]
    # by hand: full forward pass, mean loss over the batch's tokens, clip to 1, first AdamW step
    for p in params:
        p.requires_grad_(True)
    b = train.batch
    logits = model._model(**{k: v.to(_device(model)) for k, v in b.inputs().items()}, use_cache=False).logits
    nll = logits_nll(logits, b.input_ids, b.attention_mask[:, 1:])
    (nll.sum() / b.attention_mask[:, 1:].sum().to(nll.device)).backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    norm = float(torch.stack([g.norm() for g in grads]).norm())
    grads = [g * min(1.0, 1.0 / (norm + 1e-6)) for g in grads]
    want = [p0 - lr * g / (g.abs() + 1e-8) for p0, g in zip(before, grads)]
    with restore_after(params):
        losses = train_top_layers(model, train, prefix_states(model, train, n_frozen), n_train_layers=k, lr=lr,
                                  epochs=1, batch_size=len(TEXTS), progress=False)
        assert len(losses) == 1
        for p, w in zip(params, want):
            torch.testing.assert_close(p.detach(), w, atol=1e-5, rtol=1e-4)
        assert not any(p.requires_grad for p in params), "frozen again after training"
    assert all(torch.equal(p, q) for p, q in zip(params, before)), "restore_after puts the base weights back"


@pytest.mark.parametrize("k", [1, 3])
def test_training_lowers_the_training_loss_and_restore_undoes_it(llama, k):
    train = encode_texts(llama, TEXTS)
    base = token_nll(llama, train)
    n_frozen = llama.num_layers - k
    st = prefix_states(llama, train, n_frozen)
    params = top_layer_parameters(llama, k)
    frozen_before = [p.detach().clone() for p in layer_modules(llama)[0].parameters()]
    with restore_after(params):
        losses = train_top_layers(llama, train, st, n_train_layers=k, lr=1e-2, epochs=3, batch_size=2, progress=False)
        assert len(losses) == 6
        after = cached_nll(llama, train, st, n_frozen)
        assert float(after.sum()) < float(base.sum())
        torch.testing.assert_close(token_nll(llama, train), after, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(token_nll(llama, train), base)
    assert all(not p.requires_grad for p in params)
    if n_frozen:
        for p, q in zip(layer_modules(llama)[0].parameters(), frozen_before):
            assert torch.equal(p, q), "frozen layers must not change"


# ---------------------------------------------------------------- fine-tuning on (prompt, reply) pairs


def test_tokenize_pairs_masks_the_prompt(llama):
    (ids, labels), = tokenize_pairs(llama.tokenizer, [("the city of", " paris")], add_special_tokens=True, end=" <eos>")
    assert len(ids) == len(labels) == 6  # <bos> the city of | paris <eos>
    assert labels[:4] == [-100] * 4 and labels[4:] == ids[4:]


def test_lora_starts_as_the_model_and_merges_exactly(fresh):
    model = fresh()
    batch = encode(model, ["the capital of italy is"])
    base = next_token_logprobs(model, batch)
    lora = attach_lora(model, [0, 2], rank=2, seed=0)
    assert torch.equal(next_token_logprobs(model, batch), base), "B = 0: the adapters add nothing at first"
    with torch.no_grad():
        for B in lora.B:
            B.normal_()
    hooked = next_token_logprobs(model, batch)
    assert not torch.allclose(hooked, base)
    lora.merge()
    torch.testing.assert_close(next_token_logprobs(model, batch), hooked, rtol=1e-4, atol=1e-4)


def test_reply_loss_is_the_mean_loss_of_the_reply_tokens(llama):
    (ids, labels), = tokenize_pairs(llama.tokenizer, PAIRS[:1], add_special_tokens=True)
    with torch.no_grad():
        logits = llama._model(input_ids=torch.tensor([ids], device=_device(llama))).logits.cpu()
    lp = logits[0, :-1].log_softmax(-1)
    scored = [t for t in range(len(ids) - 1) if labels[t + 1] != -100]
    want = -sum(float(lp[t, ids[t + 1]]) for t in scored) / len(scored)
    assert reply_loss(llama, PAIRS[:1], add_special_tokens=True) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "layers"])
def test_finetune_lowers_the_reply_loss(fresh, method):
    model = fresh("llama")
    before = reply_loss(model, PAIRS, add_special_tokens=True)
    weights = {n: p.clone() for n, p in model._model.named_parameters()}
    res = finetune(model, PAIRS, method=method, layers=[1, 2], steps=15, batch_size=2,
                   lr=1e-2 if method == "lora" else 3e-3, rank=4, add_special_tokens=True, progress=False)
    after = reply_loss(model, PAIRS, add_special_tokens=True)
    assert len(res.losses) == 15 and res.trained > 0
    assert after < before - 0.5
    changed = {n for n, p in model._model.named_parameters() if not torch.equal(p, weights[n])}
    assert changed and all(".layers.1." in n or ".layers.2." in n for n in changed), changed
    assert not any(p.requires_grad for p in model._model.parameters()), "everything is frozen again"


def test_finetune_first_step_is_one_adamw_step_on_the_reply_loss(fresh):
    """``method="layers"``, one step over all pairs: the hand-computed AdamW step on the reply loss."""
    model = fresh()
    block = layer_modules(model)[2]
    before = [p.detach().clone() for p in block.parameters()]
    for p in block.parameters():
        p.requires_grad_(True)
    from lmbook.mechanisms.training import _collate, _reply_loss

    data = tokenize_pairs(model.tokenizer, PAIRS, add_special_tokens=True)
    order = shuffled_batches(len(PAIRS), len(PAIRS), seed=0, steps=1)[0]
    batch = _collate([data[i] for i in order], model.tokenizer.pad_token_id)
    _reply_loss(model._model, *(t.to(_device(model)) for t in batch)).backward()
    want = [p0 - 1e-3 * p.grad / (p.grad.abs() + 1e-8) for p0, p in zip(before, block.parameters())]
    for p in block.parameters():
        p.grad = None
        p.requires_grad_(False)
    finetune(model, PAIRS, method="layers", layers=[2], steps=1, batch_size=len(PAIRS), lr=1e-3,
             add_special_tokens=True, progress=False)
    for p, w in zip(block.parameters(), want):
        torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=1e-5)


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
    assert math.isfinite(reply_loss(llama, PAIRS))
