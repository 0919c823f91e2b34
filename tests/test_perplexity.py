"""Perplexity, bits per byte, per-token decomposition and top-layer training (chapter 3), on tiny
random models; corpora splitting and validation."""

import math

import pytest
import torch

from lmbook import ParameterError
from lmbook.data.corpora import check_corpora, load_documents, segment_text, split_documents, sample_segments
from lmbook.experiments.perplexity import (
    CLASSES, adapt, cached_nll, class_shares, encode_texts, layer_modules, ppl_excluding, prefix_states,
    restore_after, skip_lower_layers, summarize, token_class, token_nll, token_table, top_layer_parameters,
    top_token_shares,
)
from lmbook.mechanisms.interventions import last_token_logprobs
from lmbook.experiments.perplexity import cached_last_top1
from lmbook.core.tokens import encode
from tiny import FAMILIES

TEXTS = [
    "the eiffel tower is located in the city of paris",
    "michael jordan plays the sport of basketball and he was born in a big city",
    "the capital of italy is rome",
]


def test_bits_per_byte_equals_a_direct_computation(tiny_models):
    """Library: one nnsight trace, per-token losses summed. Direct: the transformers model's own
    mean loss times the number of predicted tokens, over the text's UTF-8 bytes."""
    for family, model in tiny_models.items():
        text = TEXTS[0]
        sc = encode_texts(model, [text])
        got = summarize(token_nll(model, sc), sc)
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]  # the tiny tokenizer adds <bos>
        with torch.no_grad():
            loss = model._model(input_ids=ids, labels=ids).loss  # mean over the ids.shape[1] - 1 predictions
        n = ids.shape[1] - 1
        direct = float(loss) * n / math.log(2) / len(text.encode("utf-8"))
        assert got["tokens"] == n and got["bytes"] == len(text)
        assert got["bits_per_byte"] == pytest.approx(direct, rel=1e-5), family
        assert got["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5), family


def test_batched_scoring_equals_one_text_at_a_time(llama):
    sc = encode_texts(llama, TEXTS)
    nll = token_nll(llama, sc, batch_size=2)
    for i, t in enumerate(TEXTS):
        one = token_nll(llama, encode_texts(llama, [t]))
        n = one.shape[1]
        torch.testing.assert_close(nll[i, :n], one[0], atol=1e-5, rtol=1e-5)
        assert (nll[i, n:] == 0).all()


def test_per_token_decomposition_sums_to_the_total_loss(llama):
    sc = encode_texts(llama, TEXTS + ["1 2 3 , . the"])
    nll = token_nll(llama, sc)
    s = summarize(nll, sc)
    table = token_table(llama, sc, nll, domain="d")
    assert len(table) == s["tokens"]
    assert table["nll"].sum() == pytest.approx(s["nats"], rel=1e-6)
    shares = class_shares(table)
    assert shares["contribution"].sum() == pytest.approx(s["nats"] / s["tokens"], rel=1e-6)
    assert shares["loss share"].sum() == pytest.approx(1.0)
    assert shares["token share"].sum() == pytest.approx(1.0)
    assert set(shares["cls"]) <= set(CLASSES)
    top = top_token_shares(table, k=3)
    assert 0 < top["loss_share"] <= 1 and top["cumulative"][-1] == pytest.approx(1.0)
    assert ppl_excluding(table, []) == pytest.approx(s["ppl"], rel=1e-6)


def test_token_classes():
    cases = {"\n": "newline", "\n   ": "newline", "    ": "space", " ": "space", ".": "punctuation",
             " (": "punctuation", "):": "punctuation", "123": "digits", " 7": "digits", "the": "word",
             " Paris": "word", "_init": "word", "x)": "other", "": "other", " \ufffd": "other"}
    for text, cls in cases.items():
        assert token_class(text) == cls, text


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
    layers = layer_modules(model)
    assert all(type(l).__name__ != "_CachedOutput" for l in layers)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_cached_last_token_prediction_equals_the_full_model(family, tiny_models):
    """What chapter 3 uses to measure recall after training: the top-1 next token from cached states."""
    model = tiny_models[family]
    b = encode(model, TEXTS + ["the capital of"])
    full = last_token_logprobs(model, b).argmax(-1)
    for n_frozen in (0, 2):
        states = prefix_states(model, b, n_frozen)
        assert torch.equal(cached_last_top1(model, b, states, n_frozen, batch_size=2), full)


def test_skip_lower_layers_restores_the_blocks_after_an_error(llama):
    before = list(layer_modules(llama))
    with pytest.raises(RuntimeError):
        with skip_lower_layers(llama, 2):
            raise RuntimeError("boom")
    assert list(layer_modules(llama)) == before


def test_zero_training_steps_leave_perplexity_unchanged(llama):
    train = encode_texts(llama, TEXTS[:2])
    test = encode_texts(llama, TEXTS[2:])
    base = summarize(token_nll(llama, test), test)
    k = 1
    n_frozen = llama.num_layers - k
    evals = {"test": (test, prefix_states(llama, test, n_frozen))}
    with restore_after(top_layer_parameters(llama, k)):
        r = adapt(llama, train, prefix_states(llama, train, n_frozen), evals, n_train_layers=k, lr=1e-2, epochs=0)
    assert r.eval_steps == [0] and r.train_loss == []
    assert r.eval_nats["test"][0] == pytest.approx(base["nats"], rel=1e-5)
    assert summarize(token_nll(llama, test), test)["nats"] == pytest.approx(base["nats"], rel=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_training_lowers_the_training_loss_and_restore_undoes_it(llama, k):
    train = encode_texts(llama, TEXTS)
    base = token_nll(llama, train)
    n_frozen = llama.num_layers - k
    st = prefix_states(llama, train, n_frozen)
    params = top_layer_parameters(llama, k)
    frozen_before = [p.detach().clone() for p in layer_modules(llama)[0].parameters()]
    with restore_after(params):
        r = adapt(llama, train, st, {"train": (train, st)}, n_train_layers=k, lr=1e-2, epochs=3, batch_size=2,
                  eval_every=2)
        assert r.steps_per_epoch == 2 and len(r.train_loss) == 6 and r.eval_steps == [0, 2, 4, 6]
        assert r.eval_nats["train"][-1] < r.eval_nats["train"][0]
        torch.testing.assert_close(token_nll(llama, train), r.final_nll["train"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(token_nll(llama, train), base)
    assert all(not p.requires_grad for p in params)
    if n_frozen:
        for p, q in zip(layer_modules(llama)[0].parameters(), frozen_before):
            assert torch.equal(p, q), "frozen layers must not change"


def test_segments_concatenate_back_to_the_document():
    text = "line one\n" * 30 + "x" * 100 + " a very long line " * 20 + "\n\nend"
    segs = segment_text(text, 64)
    assert all(len(s) <= 64 for s in segs)
    assert "".join(segs) == text  # no whitespace-only pieces in this text
    assert segment_text("  \n\n  ", 64) == []


def test_split_by_document_is_deterministic_and_stable():
    names = [f"doc{i}" for i in range(200)]
    train, test = split_documents(names, 0.2)
    assert 20 <= len(test) <= 60 and not set(train) & set(test) and set(train) | set(test) == set(names)
    assert split_documents(list(reversed(names)), 0.2)[1] == list(reversed(test))
    # a document's split does not depend on the other documents
    train2, test2 = split_documents(names + [f"new{i}" for i in range(50)], 0.2)
    assert set(test) <= set(test2) and set(train) <= set(train2)
    # a split that would be empty still gets one document
    assert split_documents(["a", "b"], 0.0)[1] and split_documents(["a", "b"], 1.0)[0]


def test_sample_segments_respects_the_budget():
    segs = [(f"d{i}", "x" * 10) for i in range(20)]
    a = sample_segments(segs, 55, seed=0)
    assert len(a) == 5 and a == sample_segments(segs, 55, seed=0)
    assert sample_segments(segs, 1, seed=0) and len(sample_segments(segs, 1, seed=0)) == 1


def test_bad_corpora_fail_with_clear_messages(tmp_path):
    with pytest.raises(ParameterError, match="built-in corpora.*encyclopedia"):
        check_corpora(["no-such-corpus"])
    with pytest.raises(ParameterError, match="CORPORA must be"):
        check_corpora("encyclopedia")
    with pytest.raises(ParameterError, match="empty"):
        check_corpora([])
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(ParameterError, match="holds 1 non-empty .txt"):
        check_corpora([str(tmp_path)])
    (tmp_path / "two.txt").write_text("a second document")
    srcs = check_corpora(["encyclopedia", str(tmp_path)])
    assert [s.name for s in srcs] == ["encyclopedia", tmp_path.name]
    assert srcs[1].load() == {"one.txt": "just one document", "two.txt": "a second document"}
    with pytest.raises(ParameterError, match="already listed"):
        check_corpora(["encyclopedia", "encyclopedia"])


def test_licence_corpus_keeps_each_licence_once():
    from lmbook.data.corpora import BUILTIN_CORPORA, _licence_key

    mit = "Permission is hereby granted, free of charge, to any person obtaining a copy\nof this software.\n"
    a = "Copyright (c) 2020 Alice\n\n" + mit
    b = "The copyright holder is Bob, 2024.\n" + mit.upper().replace(",", " ,")
    assert _licence_key(a) == _licence_key(b)  # only the copyright line, case and punctuation differ
    assert _licence_key(a) != _licence_key(a + "Additional clause.\n")
    docs = load_documents(BUILTIN_CORPORA["licences"])
    assert len(docs) >= 3 and all(t.strip() for t in docs.values())
    assert len({_licence_key(t) for t in docs.values()}) == len(docs)
    assert all(".dist-info/" in name for name in docs)
    # only the distributions pinned in constraints.txt: a package installed by hand does not change the corpus
    from lmbook.data.corpora import _normalise, _pinned_packages

    pinned = _pinned_packages()
    assert pinned and "torch" in pinned and "pip" not in pinned
    assert all(_normalise(n.split(".dist-info/")[0].rsplit("-", 1)[0]) in pinned for n in docs)
