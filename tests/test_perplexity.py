"""Unit tests of lmbook.experiments.perplexity (chapter 3, after Öncel et al. 2024) on tiny random
models: bits per byte, the per-token decomposition, token classes, one adaptation run, and the
chapter's protocol functions end to end."""

import math

import numpy as np
import pytest
import torch

from lmbook.core.models import load_model
from lmbook.core.params import ParameterError
from lmbook.core.records import to_jsonable
from lmbook.data.corpora import build_corpus, check_corpora
from lmbook.data.facts import Fact
from lmbook.experiments.perplexity import (
    CLASSES,
    RecallChanges,
    adapt,
    adaptation_baseline,
    adaptation_sweep,
    bpb_change,
    change_drivers,
    class_shares,
    depth_comparison,
    direction,
    evenly_spaced,
    loss_concentration,
    ppl_excluding,
    readable_tokens,
    recall_changes,
    run_directions,
    score_models,
    score_precision,
    similarity,
    summarize,
    token_class,
    token_table,
    token_texts,
    tokenizer_gap,
    top_token_shares,
    unigram_js,
)
from lmbook.mechanisms.likelihood import encode_texts, token_nll
from lmbook.mechanisms.training import prefix_states, restore_after, top_layer_parameters

TEXTS = [
    "the eiffel tower is located in the city of paris",
    "michael jordan plays the sport of basketball and he was born in a big city",
    "the capital of italy is rome",
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bits_per_byte_equals_a_direct_computation(family, tiny_models):
    """Library: one nnsight trace, per-token losses summed. Direct: the transformers model's own
    mean loss times the number of predicted tokens, over the text's UTF-8 bytes."""
    model = tiny_models[family]
    text = TEXTS[0]
    sc = encode_texts(model, [text])
    got = summarize(token_nll(model, sc), sc)
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]  # the tiny tokenizer adds <bos>
    ids = ids.to(next(model._model.parameters()).device)
    with torch.no_grad():
        loss = model._model(input_ids=ids, labels=ids).loss  # mean over the ids.shape[1] - 1 predictions
    n = ids.shape[1] - 1
    direct = float(loss) * n / math.log(2) / len(text.encode("utf-8"))
    assert got["tokens"] == n and got["bytes"] == len(text)
    assert got["bits_per_byte"] == pytest.approx(direct, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(math.log2(got["ppl"]) / got["bytes_per_token"], rel=1e-9)


def test_per_token_decomposition_sums_to_the_total_loss(llama):
    sc = encode_texts(llama, TEXTS + ["1 2 3 , . the"])
    nll = token_nll(llama, sc)
    s = summarize(nll, sc)
    table = token_table(llama, sc, nll, domain="d")
    assert len(table) == s["tokens"] and (table["domain"] == "d").all()
    assert table["nll"].sum() == pytest.approx(s["nats"], rel=1e-6)
    shares = class_shares(table)
    assert shares["contribution"].sum() == pytest.approx(s["nats"] / s["tokens"], rel=1e-6)
    assert shares["loss share"].sum() == pytest.approx(1.0)
    assert shares["token share"].sum() == pytest.approx(1.0)
    assert set(shares["cls"]) <= set(CLASSES)
    top = top_token_shares(table, k=3)
    assert 0 < top["loss_share"] <= 1 and top["cumulative"][-1] == pytest.approx(1.0)
    assert ppl_excluding(table, []) == pytest.approx(s["ppl"], rel=1e-6)
    assert math.isnan(ppl_excluding(table, CLASSES))


def test_token_classes():
    cases = {"\n": "newline", "\n   ": "newline", "    ": "space", " ": "space", ".": "punctuation",
             " (": "punctuation", "):": "punctuation", "123": "digits", " 7": "digits", "the": "word",
             " Paris": "word", "_init": "word", "x)": "other", "": "other", " \ufffd": "other"}
    for text, cls in cases.items():
        assert token_class(text) == cls, text


def test_token_texts_add_up_to_the_decoded_text(llama):
    ids = llama.tokenizer("the city of paris", add_special_tokens=False)["input_ids"]
    assert "".join(token_texts(llama, ids)) == llama.tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def test_small_helpers():
    assert evenly_spaced(list(range(10)), 0) == list(range(10))
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 8]  # round(i * 10 / 4)
    assert evenly_spaced([1, 2], 5) == [1, 2]
    import pandas as pd

    assert readable_tokens(pd.DataFrame({"text": ["\n", " a"]}))["text"].tolist() == ["'\\n'", "' a'"]


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
    assert r.eval_segments["test"][0].shape == (len(test),)
    assert summarize(token_nll(llama, test), test)["nats"] == pytest.approx(base["nats"], rel=1e-6)


def test_adapt_scores_the_eval_sets_at_its_marks(llama):
    train = encode_texts(llama, TEXTS)
    k = 2
    st = prefix_states(llama, train, llama.num_layers - k)
    base = token_nll(llama, train)
    with restore_after(top_layer_parameters(llama, k)):
        r = adapt(llama, train, st, {"train": (train, st)}, n_train_layers=k, lr=1e-2, epochs=3, batch_size=2,
                  eval_steps=[2, 4, 99], finals={"all": (train, st)}, desc="test")
        assert r.steps_per_epoch == 2 and len(r.train_loss) == 6 and r.eval_steps == [0, 2, 4, 6]
        assert len(r.eval_nats["train"]) == 4 and r.eval_nats["train"][-1] < r.eval_nats["train"][0]
        assert r.eval_nats["train"][0] == pytest.approx(float(base.sum()), rel=1e-5)
        torch.testing.assert_close(token_nll(llama, train), r.final_nll["all"], atol=1e-4, rtol=1e-4)
        assert r.eval_nats["train"][-1] == pytest.approx(float(r.final_nll["all"].sum()), rel=1e-5)
        initial = {"train": np.full(len(train), 5.0)}  # given initial nats are taken as they are, not scored again
        r2 = adapt(llama, train, st, {"train": (train, st)}, n_train_layers=k, lr=1e-2, epochs=1, batch_size=2,
                   initial=initial, warmup=1, schedule="cosine", bf16=True)
        assert r2.eval_steps == [0, 2] and r2.eval_nats["train"][0] == 5.0 * len(train)
        assert r2.eval_nats["train"][-1] < float(base.sum())  # mixed-precision training still learns


# ---------------------------------------------------------------- the chapter's protocol, end to end

WORDS = "the a of in is city capital tower located paris rome france italy plays sport music piano speaks".split()


@pytest.fixture
def corpora(tmp_path):
    out = []
    for name, shift in [("alpha", 0), ("beta", 7)]:
        folder = tmp_path / name
        folder.mkdir()
        for i in range(8):
            lines = [" ".join(WORDS[(shift + i + j + w) % len(WORDS)] for w in range(6)) for j in range(6)]
            (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
        src, = check_corpora([str(folder)])
        out.append(build_corpus(src, train_chars=400, test_chars=200, max_chars=80, test_fraction=0.3, seed=0))
    return out


FACTS = [Fact("f0", "capital", "italy", "the capital of {} is", "the capital of italy is", "rome"),
         Fact("f1", "capital", "france", "the capital of {} is", "the capital of france is", "paris"),
         Fact("f2", "plays", "michael jordan", "{} plays the sport of", "michael jordan plays the sport of",
              "basketball")]


def test_the_chapter_protocol_end_to_end(tiny_dirs, corpora, test_device):
    main, other = str(tiny_dirs["llama"]), str(tiny_dirs["gpt2"])
    model = load_model(main, device=test_device, dtype=torch.float32)  # its own copy: the sweep trains it
    n_frozen = 1
    scores = score_models(model, main, [main, other], corpora, n_frozen=n_frozen, device=test_device)
    assert len(scores.table) == 4 and set(scores.tests) == {"alpha", "beta"}
    for d in scores.domains:
        assert scores.states[d].shape[:2] == scores.tests[d].batch.input_ids.shape
    gap = tokenizer_gap(scores)
    for _, row in gap.table.iterrows():  # log2 ppl = bits per byte x bytes per token, split exactly
        assert row[f"log2 ppl gap vs {other}"] == pytest.approx(row["quality term"] + row["tokenizer term"])
    conc = loss_concentration(scores, top_k=3)
    assert set(conc.cumulative) == set(scores.tokens) and (conc.top_types["loss share"] <= 1).all()

    base = adaptation_baseline(model, scores, FACTS)
    assert base.cache_error < 1e-4 and base.known.dtype == torch.bool and len(base.known) == 3
    weights = [p.detach().clone() for p in model._model.parameters()]
    sweep = adaptation_sweep(model, corpora, base, lrs=[1e-3, 1e-2], epochs=2, batch_size=2, curve_points=2)
    assert all(torch.equal(p, q) for p, q in zip(model._model.parameters(), weights)), "every run is undone"
    assert len(sweep.runs) == 4 and sweep.n_train_layers == model.num_layers - n_frozen
    start = sweep.curves[sweep.curves.step == 0]
    assert len(start) == 4 * 2 and (start["delta bpb"] == 0).all()
    assert sweep.curves.groupby(["train domain", "lr", "test domain"]).size().eq(3).all()  # step 0 and 2 points
    ch = sweep.changes
    assert len(ch) == 4 * 2 and ((ch.low <= ch["delta bpb"]) & (ch["delta bpb"] <= ch.high)).all()
    assert ((ch.direction == "rise") == (ch.low > 0)).all() and ((ch.direction == "fall") == (ch.high < 0)).all()
    # the change of a whole test set is its total loss change over its bytes
    run = sweep.runs[0]
    d = run.domain
    after = float((run.result.final_nll[d] * base.tests[d].target_mask).sum())
    row = ch[(ch["train domain"] == d) & (ch.lr == run.lr) & (ch["test domain"] == d)].iloc[0]
    assert row["delta bpb"] == pytest.approx((after - base.initial[d]) / math.log(2) / base.nbytes[d], rel=1e-4)
    for d in scores.domains:
        assert sweep.base_bpb[d] == pytest.approx(float(scores.table.set_index(["model", "domain"])
                                                        .loc[(main, d), "bits_per_byte"]), rel=1e-5)
    assert set(sweep.same_domain().index) == {(d, lr) for d in ("alpha", "beta") for lr in (1e-3, 1e-2)}

    drivers = change_drivers(model, scores, sweep, n_tokens=2)
    for (_, c), (_, s) in zip(drivers.contributions.iterrows(), ch[ch.same].iterrows()):
        assert sum(c[k] for k in CLASSES) == pytest.approx(c["total"], abs=1e-6)
        assert c["low"] <= c["total"] <= c["high"]
        assert c["total"] == pytest.approx(s["delta bpb"], abs=1e-4)  # the classes add up to the run's change
        for k in c["carriers"].split(", ") if c["carriers"] else []:
            assert (c[f"{k} low"] > 0) if c["total"] > 0 else (c[f"{k} high"] < 0)
    sim = similarity(model, corpora, sweep, base, "alpha", corpora[0].test)
    assert list(sim.table.domain) == ["alpha", "beta"] and (sim.table["JS divergence"] >= 0).all()
    assert sim.rho_divergence.missing  # two domains: no rank correlation to compute
    assert sim.n_documents == sum(len(set(base.sources[d])) for d in base.tests)
    depth = depth_comparison(model, corpora[0], base, [1, model.num_layers], lr=1e-2, train_chars=200, batch_size=2,
                             fp32_layers=[1])
    assert set(depth.table["train layers"]) == {1, model.num_layers} and len(depth.table) == 3 * 2
    assert list(depth.table.precision) == ["bf16"] * 4 + ["float32"] * 2
    e = depth.same_domain(1, "float32")
    assert e.low <= e.value <= e.high
    assert all(torch.equal(p, q) for p, q in zip(model._model.parameters(), weights)), "the comparison is undone"
    recall = recall_changes(base, sweep, corpora)
    for _, r in recall.table.iterrows():
        assert r["recall after"] - r["recall before"] == pytest.approx((r["gained"] - r["lost"]) / 3)
    assert recall.n_facts == 3 and not recall.seen.any()  # no encyclopedia corpus: no seen subjects

    records = {}
    for part in (scores, gap, conc, sweep, drivers, recall, sim, depth):
        keys = part.records()
        assert not set(keys) & set(records), "each result is recorded by one protocol"
        records.update(keys)
    to_jsonable(records)  # everything the chapter records is JSON
    assert records["n_runs"] == 4 and records["n_scored_models"] == 2 and records["top_k"] == 3

    # what the chapter's claims rest on: each run's direction, and the correlation over runs
    dirs = run_directions(sweep)
    assert len(dirs) == 4 and set(dirs.direction) <= {"rise", "fall", "unclear"}
    for _, r in dirs.iterrows():
        assert r["change"] == pytest.approx(sweep.same_domain()[r["domain"], r["lr"]])
        assert (r["direction"] == "rise") == (r["low"] > 0) and (r["direction"] == "fall") == (r["high"] < 0)
        assert math.isfinite(r["other domains"])
    rho = recall.correlation(n_boot=100)
    assert rho.missing or rho.low <= rho.value <= rho.high


def test_recall_correlation_over_runs():
    import pandas as pd

    table = pd.DataFrame({"mean change bpb, all domains": np.linspace(-0.1, 0.3, 9),
                          "change": -np.linspace(-0.1, 0.3, 9) + np.tile([0.0, 0.01, -0.01], 3)})
    rc = RecallChanges(table, 0.5, 100, torch.zeros(100, dtype=torch.bool), [1e-4])
    rho = rc.correlation(n_boot=200)
    assert rho.value == pytest.approx(table.iloc[:, 0].rank().corr(table["change"].rank())) and rho.high < 0
    flat = RecallChanges(table.assign(change=0.0), 0.5, 100, torch.zeros(100, dtype=torch.bool), [1e-4])
    assert flat.correlation().missing
    assert RecallChanges(table[:2], 0.5, 100, torch.zeros(100), [1e-4]).correlation().missing  # too few runs


# ---------------------------------------------------------------- intervals over documents

def test_cluster_ratio_bootstrap_on_fixed_arrays():
    from lmbook.core.stats import cluster_ratio_bootstrap, group_sums

    labels, sums = group_sums([1.0, 2.0, 3.0, 4.0], ["b", "a", "b", "c"])
    assert labels.tolist() == ["a", "b", "c"] and sums.tolist() == [2.0, 4.0, 4.0]
    # one document per segment: the same as resampling segments
    num, den = np.array([1.0, -1.0, 2.0, 0.5]), np.array([10.0, 10.0, 20.0, 10.0])
    r, lo, hi = cluster_ratio_bootstrap(num, den, None, n_boot=500)
    assert r == pytest.approx(2.5 / 50) and lo <= r <= hi
    # segments of one document move together: resampling documents widens the interval
    docs = ["d0", "d0", "d1", "d1", "d2", "d2", "d3", "d3"]
    x = np.array([1.0, 1.1, -1.0, -0.9, 0.5, 0.6, -0.2, -0.1])
    _, lo_s, hi_s = cluster_ratio_bootstrap(x, np.ones(8), None, n_boot=2000)
    r_d, lo_d, hi_d = cluster_ratio_bootstrap(x, np.ones(8), docs, n_boot=2000)
    assert r_d == pytest.approx(x.mean()) and hi_d - lo_d > hi_s - lo_s
    # a constant change per byte has a zero-width interval whatever is resampled
    r_c, lo_c, hi_c = cluster_ratio_bootstrap(np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0]), ["a", "a", "b"])
    assert r_c == lo_c == hi_c == pytest.approx(2.0)
    # several rows (token classes) at once, each its own ratio over the same bytes
    rows, lo_r, hi_r = cluster_ratio_bootstrap(np.stack([x, -x]), np.ones(8), docs, n_boot=500)
    assert rows[0] == pytest.approx(-rows[1]) and (lo_r <= rows).all() and (rows <= hi_r).all()
    with pytest.raises(ValueError):
        group_sums([1.0, 2.0], ["a"])


def test_bpb_change_and_direction():
    e = bpb_change(np.array([math.log(2)] * 4), np.array([1, 1, 1, 1]), ["a", "b", "c", "d"])
    assert e.value == pytest.approx(1.0) and e.low == pytest.approx(1.0) and direction(e) == "rise"
    e = bpb_change(np.array([1.0, -1.0, 0.5, -0.5]), np.array([4, 4, 4, 4]), ["a", "b", "c", "d"])
    assert e.value == pytest.approx(0.0) and direction(e) == "unclear"
    assert direction(bpb_change(np.array([-1.0, -2.0]), np.array([3, 3]), ["a", "b"])) == "fall"


def test_unigram_js_divergence():
    assert unigram_js([1, 2, 3], [3, 2, 1]) == pytest.approx(0.0)
    assert unigram_js([1, 1], [2, 2]) == pytest.approx(1.0)  # disjoint: one bit
    assert 0 < unigram_js([1, 1, 2], [1, 2, 2]) < 1


def test_lr_schedule():
    from lmbook.mechanisms.training import lr_schedule

    f = lr_schedule(10, warmup=2, kind="cosine", floor=0.1)
    assert [f(0), f(1)] == pytest.approx([1 / 3, 2 / 3]) and f(2) == pytest.approx(1.0) and f(9) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(2, 9))
    g = lr_schedule(10, warmup=0)
    assert all(g(i) == 1.0 for i in range(10))


def test_scored_only_models_in_bfloat16_with_a_float32_comparison(tiny_dirs, tiny_models, corpora, test_device):
    """The model that is trained is scored as loaded; the others on bfloat16 copies, and the first of
    them also scores a few segments of the first domain in float32, which :func:`score_precision`
    compares; the same segments scored in float32 directly give the recorded exact bits per byte."""
    main, other = str(tiny_dirs["llama"]), str(tiny_dirs["gpt2"])
    model = tiny_models["llama"]
    scores = score_models(model, main, [main, other], corpora, n_frozen=0, device=test_device, dtype="bfloat16",
                          precision_segments=2)
    p = scores.precision
    assert scores.dtype == "bfloat16" and p["model"] == other and p["domain"] == corpora[0].name
    assert p["n_segments"] == 2 and 1 <= p["n_documents"] <= 2
    table = scores.table.set_index(["model", "domain"])
    assert p["bpb"]["value"] == pytest.approx(table.loc[(other, corpora[0].name), "bits_per_byte"], rel=1e-6)
    assert p["half_width"] == pytest.approx((p["bpb"]["high"] - p["bpb"]["low"]) / 2)
    d = p["difference"]
    assert d["low"] <= d["value"] <= d["high"]
    assert d["value"] == pytest.approx(p["bpb_fast"] - p["bpb_exact"], abs=1e-9)
    assert abs(d["value"]) < 0.1 * p["bpb_exact"]  # a precision change, not another model
    exact_model = load_model(other, device=test_device, dtype=torch.float32, attention_probs=False)
    sc = encode_texts(exact_model, corpora[0].test)
    sub = sc.select(evenly_spaced(range(len(sc)), 2))
    assert p["bpb_exact"] == pytest.approx(summarize(token_nll(exact_model, sub), sub)["bits_per_byte"], rel=1e-6)
    # the trained model's own scores stay in its dtype: those of a float32 run
    exact = score_models(model, main, [main], corpora, n_frozen=0, device=test_device)
    assert exact.precision is None and exact.dtype == "float32"
    assert exact.table["nats"].tolist() == table.loc[main, "nats"].tolist()
    assert to_jsonable(scores.records())["score_precision"] == p


def test_score_precision_of_identical_scores_is_zero(tiny_models):
    model = tiny_models["llama"]
    sc = encode_texts(model, TEXTS)
    nll = token_nll(model, sc)
    p = score_precision(nll, nll[[0, 2]], sc, ["a", "a", "b"], [0, 2])
    assert p["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0} and p["n_documents"] == 2
    sub = sc.select([0, 2])
    w = sub.batch.input_ids.shape[1] - 1
    assert p["bpb_fast"] == p["bpb_exact"] == pytest.approx(summarize(nll[[0, 2], :w], sub)["bits_per_byte"])
    with pytest.raises(ParameterError, match="3 rows for 2 segments"):
        score_precision(nll, nll, sc, ["a", "a", "b"], [0, 2])
