"""Chapter 3 (perplexity pitfalls): properties its recorded results must have, whatever the model shows."""

import json
import math

import papermill as pm
import pytest

from claimcheck import assert_claims

from conftest import ROOT, smoke_params

pytestmark = pytest.mark.chapters


def test_smoke_results(smoke_run):
    run = smoke_run("03_perplexity")
    res, params = run.results, run.params
    assert res["model"] == params["MODEL"]
    assert res["n_domains"] == len(params["CORPORA"]) == len(res["corpora"])
    models = set(params["COMPARE_MODELS"]) | {params["MODEL"]}
    assert res["n_scored_models"] == len(models)
    assert 0 <= res["rank_flips"] <= res["n_domains"]
    for c in res["corpora"]:
        assert c["train documents"] > 0 and c["test documents"] > 0
        assert 0 < c["test characters"] <= params["TEST_CHARS"] and c["train characters"] <= params["TRAIN_CHARS"]

    # bits per byte and perplexity are two views of the same total loss
    assert len(res["scores"]) == len(models) * res["n_domains"]
    for s in res["scores"]:
        assert s["bits_per_byte"] == pytest.approx(s["nats"] / math.log(2) / s["bytes"], rel=1e-9)
        assert s["ppl"] == pytest.approx(math.exp(s["nats"] / s["tokens"]), rel=1e-9)
        assert s["bits_per_byte"] == pytest.approx(math.log2(s["ppl"]) / s["bytes_per_token"], rel=1e-9)
    for s in res["token_shares"]:
        assert 0 <= s["loss share of whitespace"] <= 1 and 0 < s[f"loss share of top {res['top_k']} types"] <= 1

    # every run starts from the base model: its learning curve starts at zero change
    assert res["n_runs"] == len(params["CORPORA"]) * len(params["LRS"])
    start = [c for c in res["curves"] if c["step"] == 0]
    assert len(start) == res["n_runs"] * res["n_domains"]
    assert all(c["delta bpb"] == 0 and c["low"] == 0 == c["high"] for c in start)
    assert res["epochs"] == params["EPOCHS"] and res["train_tokens_min"] > 0

    # each change on a whole test set is the adapted minus the base bits per byte, with an interval around it
    base = {(s["domain"]): s["bits_per_byte"] for s in res["scores"] if s["model"] == params["MODEL"]}
    assert len(res["changes"]) == res["n_runs"] * res["n_domains"]
    for c in res["changes"]:
        assert c["test set"] == ("whole" if c["same"] else "curve subset")  # the other domains: their curve subsets
        if c["test set"] == "whole":
            assert c["base bpb"] == pytest.approx(base[c["test domain"]], rel=1e-4)
        assert c["bpb after"] - c["base bpb"] == pytest.approx(c["delta bpb"], abs=1e-9)
        assert c["low"] <= c["delta bpb"] <= c["high"]
        assert c["direction"] == ("rise" if c["low"] > 0 else "fall" if c["high"] < 0 else "unclear")
    same = [c for c in res["changes"] if c["same"]]
    assert res["n_runs_same_domain_rise"] == sum(c["direction"] == "rise" for c in same)
    assert res["n_runs_same_domain_fall"] == sum(c["direction"] == "fall" for c in same)

    # the per-token decomposition of each change adds up to it, class by class with intervals
    classes = ["newline", "space", "punctuation", "digits", "word", "other"]
    by_run = {(c["train domain"], c["lr"]): c["delta bpb"] for c in same}
    for c in res["contributions"]:
        assert sum(c[k] for k in classes) == pytest.approx(c["total"], abs=1e-6)
        assert c["total"] == pytest.approx(by_run[c["domain"], c["lr"]], abs=1e-3)
        for k in classes:
            assert c[f"{k} low"] <= c[k] <= c[f"{k} high"]

    # closeness measures and the depth comparison
    assert [r["domain"] for r in res["similarity"]] == params["CORPORA"]
    assert all(0 <= r["JS divergence"] <= 1 for r in res["similarity"])
    assert res["n_rho_documents"] == sum(c["sampled test documents"] for c in res["corpora"])
    assert len(res["depth_layers"]) == 2 and res["depth_domain"] == params["CORPORA"][0]
    assert res["finding"]["verdict"] in {"reproduced", "partly", "not", "no_data"}

    # the scored-only models ran as SCORE_DTYPE copies; the first of them also in float32 on a few segments
    p = res["score_precision"]
    assert res["score_dtype"] == params.get("SCORE_DTYPE", "bfloat16") != "float32"
    other = next(m for m in params["COMPARE_MODELS"] if m != params["MODEL"])
    assert p["model"] == other and p["domain"] == params["CORPORA"][0] and p["dtype"] == res["score_dtype"]
    assert p["n_segments"] == params["PRECISION_SEGMENTS"] and 1 <= p["n_documents"] <= p["n_segments"]
    d = p["difference"]
    assert d["low"] <= d["value"] <= d["high"] and d["value"] == pytest.approx(p["bpb_fast"] - p["bpb_exact"])
    scored = {(s["model"], s["domain"]): s["bits_per_byte"] for s in res["scores"]}
    assert p["bpb"]["value"] == pytest.approx(scored[other, p["domain"]], rel=1e-6)
    assert p["bpb"]["low"] <= p["bpb"]["value"] <= p["bpb"]["high"]
    assert abs(d["value"]) < 0.05 * p["bpb_exact"]  # a change of precision, not of model
    small = abs(d["value"]) <= 0.1 * p["half_width"]
    assert res["claims"]["claim_score_precision"]["outcome"] == ("small" if small else "large")

    # knowledge
    assert 0 <= res["recall_base"] <= 1 and res["n_facts"] == params["FACTS_LIMIT"]
    for r in res["recall"]:
        assert r["recall before"] == pytest.approx(res["recall_base"])
        assert r["recall after"] - r["recall before"] == pytest.approx((r["gained"] - r["lost"]) / res["n_facts"])
        assert r["low"] <= r["change"] <= r["high"]


def test_bad_corpora_fail_at_once(tmp_path):
    params = smoke_params("03_perplexity", tmp_path / "results")
    params["CORPORA"] = ["licences", "no-such-corpus"]
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "chapters" / "03_perplexity.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters=params, kernel_name="python3", progress_bar=False)
    assert e.value.ename == "ParameterError"
    assert "no-such-corpus" in e.value.evalue and "python-docs" in e.value.evalue
    nb = json.loads((tmp_path / "out.ipynb").read_text())
    cells = nb["cells"]
    failed = [i for i, c in enumerate(cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    injected = next(i for i, c in enumerate(cells) if "injected-parameters" in c.get("metadata", {}).get("tags", []))
    assert failed == [next(i for i, c in enumerate(nb["cells"]) if i > injected and c["cell_type"] == "code")]
    assert not (tmp_path / "results").exists()


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("03_perplexity"))
