"""Unit tests of lmbook.mechanisms.likelihood (chapter 3 scores texts with it; chapters 4 and 5 use
``logits_nll``), on tiny random models."""

import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import start_token_id
from lmbook.mechanisms.likelihood import encode_texts, length_batches, logits_nll, token_nll

from tiny import FAMILIES

TEXTS = [
    "the eiffel tower is located in the city of paris",
    "michael jordan plays the sport of basketball and he was born in a big city",
    "the capital of italy is rome",
]


def test_logits_nll_is_the_masked_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    ids = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    nll = logits_nll(logits, ids, mask)
    assert nll.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            want = -logits[b, t].log_softmax(-1)[ids[b, t + 1]] * mask[b, t]
            torch.testing.assert_close(nll[b, t], want)


def test_logits_nll_in_chunks_equals_one_pass_and_keeps_gradients():
    """Chunks of rows (here 2 logits rows at a time) and bfloat16 logits give the one-pass
    cross-entropy; the gradient reaches the logits as training needs."""
    torch.manual_seed(1)
    logits = torch.randn(3, 9, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 9))
    mask = (torch.rand(3, 8) > 0.3).float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1),
                                            reduction="none").view(3, 8) * mask
    got = logits_nll(logits, ids, mask, chunk_elements=22)
    torch.testing.assert_close(got, ref)
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    g_got, = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(g_got, g_ref)
    half = logits.detach().to(torch.bfloat16)
    ref16 = torch.nn.functional.cross_entropy(half[:, :-1].float().reshape(-1, 11), ids[:, 1:].reshape(-1),
                                              reduction="none").view(3, 8) * mask
    torch.testing.assert_close(logits_nll(half, ids, mask, chunk_elements=11), ref16)
    assert logits_nll(logits[:, :1], ids[:, :1], mask[:, :0]).shape == (3, 0)


def test_encode_texts_puts_one_start_token_first_and_counts_bytes(llama):
    sc = encode_texts(llama, ["the city of paris", "rome"])
    start = start_token_id(llama)  # None: the tiny tokenizer adds its own <bos>
    first = llama.tokenizer.bos_token_id if start is None else start
    assert (sc.batch.input_ids[:, 0] == first).all() and (sc.batch.input_ids[:, 1] != first).all()
    assert sc.nbytes.tolist() == [len("the city of paris"), len("rome")]
    assert sc.target_mask.sum(1).tolist() == [4, 1]  # every token of the text is predicted, nothing else
    assert sc.select([1]).texts == ["rome"]
    with pytest.raises(ParameterError, match="non-empty list"):
        encode_texts(llama, "rome")


def test_length_batches_cover_every_row_once(llama):
    sc = encode_texts(llama, TEXTS + ["a"])
    groups = list(length_batches(sc, 2))
    assert sorted(i for g in groups for i in g) == list(range(4)) and all(len(g) <= 2 for g in groups)
    assert groups[0] == [3, 2]  # the shortest first


@pytest.mark.parametrize("family", FAMILIES)
def test_token_nll_equals_the_models_own_loss(family, tiny_models):
    """One nnsight trace per batch against the transformers model's mean loss with labels."""
    model = tiny_models[family]
    sc = encode_texts(model, TEXTS[:1])
    nll = token_nll(model, sc)
    with torch.no_grad():
        dev = next(model._model.parameters()).device
        inputs = {k: v.to(dev) for k, v in sc.batch.inputs().items()}
        loss = model._model(**inputs, labels=sc.batch.input_ids.to(dev)).loss
    assert float(nll.sum() / sc.target_mask.sum()) == pytest.approx(float(loss), rel=1e-5)


def test_batched_scoring_equals_one_text_at_a_time(llama):
    sc = encode_texts(llama, TEXTS)
    nll = token_nll(llama, sc, batch_size=2)
    for i, t in enumerate(TEXTS):
        one = token_nll(llama, encode_texts(llama, [t]))
        n = one.shape[1]
        torch.testing.assert_close(nll[i, :n], one[0], atol=1e-5, rtol=1e-5)
        assert (nll[i, n:] == 0).all()


def test_states_after_leave_the_losses_unchanged(llama):
    sc = encode_texts(llama, TEXTS)
    nll, states = token_nll(llama, sc, states_after=1)
    torch.testing.assert_close(nll, token_nll(llama, sc))
    assert states.shape == (3, sc.batch.input_ids.shape[1], llama.hidden_size)
