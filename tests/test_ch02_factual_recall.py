"""Chapter 2 (factual recall): properties its recorded results must have, whatever the model shows."""

import math

import pytest

from claimcheck import assert_claims
from lmbook.data.facts import load_facts

pytestmark = pytest.mark.chapters


def test_smoke_results(smoke_run):
    run = smoke_run("02_factual_recall")
    r, p = run.results, run.params
    facts = load_facts(p["FACTS_PATH"])
    assert r["model"] == p["MODEL"]
    assert r["n_facts"] == len(facts) and r["n_relations"] == len({f.relation for f in facts})
    # counts match the data
    table = {row["relation"]: row for row in r["known_by_relation"]}
    assert table["all"]["facts"] == len(facts)
    assert sum(row["facts"] for k, row in table.items() if k != "all") == len(facts)
    assert table["all"][p["MODEL"]] == r["n_known"] <= len(facts)
    assert 0.0 <= r["known_rate"] <= 1.0 and r["known_rate"] == pytest.approx(r["n_known"] / len(facts))
    assert r["n_used"] == min(p["MAX_FACTS"], r["n_known"])
    # knockout: relative changes are >= -100%, layers in range
    for key in ["ko_subject_min", "ko_nonsubject_min", "ko_last_min"]:
        assert r[key] >= -100.0
    curves = r["ko_curves"][p["MODEL"]]
    n_layers = len(curves["subject"])
    assert 0 <= r["ko_subject_min_layer"] < n_layers and 0.0 <= r["ko_subject_min_depth"] <= 1.0
    if p.get("WINDOW", 0) == 0:  # the paper's relative depth: odd, at least three layers
        assert r["ko_window"] % 2 == 1 and 3 <= r["ko_window"] <= n_layers
    # the protocol table has a row per item, and the chapter's finding a computed verdict
    assert len(r["paper_items"]) == 6 and all(row["this run"] for row in r["paper_items"])
    assert r["finding"]["verdict"] in {"reproduced", "partly", "not", "no_data"}
    assert r["enrich_source"] in {"long", "short"} and 1 <= r["n_enrich"] <= p["N_ENRICH"]
    # rates lie in [0, 100] (percent) and intervals bracket their means
    for key in ["rate_subject_last_peak", "rate_last_peak", "rate_subject_first_peak", "enrich_clean",
                "enrich_mlp_early", "enrich_attn_early"]:
        assert 0.0 <= r[key] <= 100.0
    for key in ["attention", "mlp", "attention_blocked"]:
        assert 0.0 <= r[f"extract_{key}_lo"] <= r[f"extract_{key}"] <= r[f"extract_{key}_hi"] <= 100.0
    assert 0 <= r["enrich_read_layer"] < n_layers
    # causal tracing: probabilities, and the corrupted run is no better than chance of exceeding 1
    if p.get("N_TRACE", 1) > 0:
        assert 0.0 <= r["trace_p_corrupt"] <= 1.0 and 0.0 < r["trace_p_clean"] <= 1.0
        assert math.isfinite(r["trace_mlp_subject_last_peak"])
        # the tracing copy's precision, measured against float32 on the traced facts (at most PRECISION_FACTS)
        prec = r["trace_precision"][p["MODEL"]]
        assert prec["n_facts"] == min(p["N_TRACE"], 6) and 0.0 <= prec["max_difference"] < 0.5
    # the knockout and lens copy's precision: the three experiments rerun in float32 on the first facts
    dis = r["dissect_precision"][p["MODEL"]]
    assert set(dis) == {"knockout", "enrichment", "sublayer"}
    assert dis["knockout"]["n_facts"] == min(r["n_used"], 6) and dis["sublayer"]["n_facts"] == min(p["N_SUBLAYER"], 6)
    for v in dis.values():
        assert v["n_facts"] >= 1 and 0.0 <= v["max_difference"] <= 200.0 and v["max_value"] >= 0.0


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("02_factual_recall"))


HELDOUT = {  # relations and subjects the book never uses, in files written for this test
    "FACTS_PATH": "tests/data/facts_heldout.jsonl",
    "DESCRIPTIONS_PATH": "tests/data/subjects_heldout.jsonl",
    # paragraphs for all subjects but the novels': the chapter must use only facts that have one
    "LONG_DESCRIPTIONS_PATH": "tests/data/subjects_heldout_long.jsonl",
    # a tokenizer that adds no BOS token, so the run without the start token is exercised too
    "MODEL": "smollm2-135m-instruct",
    "DESCRIPTION_WORDS": [5, 10],
}


def test_held_out_relations_run_through_the_chapter(tmp_path):
    """The chapter's code path on a facts file of four relations it never saw (smoke sizes)."""
    import json

    import papermill as pm

    from conftest import ROOT, smoke_params

    params = {**smoke_params("02_factual_recall", tmp_path / "results"), **HELDOUT}
    pm.execute_notebook(str(ROOT / "chapters" / "02_factual_recall.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters=params, kernel_name="python3", progress_bar=False, cwd=str(ROOT / "chapters"))
    r = json.loads((tmp_path / "results" / "02_factual_recall.json").read_text())
    facts = load_facts(ROOT / HELDOUT["FACTS_PATH"])
    assert r["n_facts"] == len(facts) == 24 and r["n_relations"] == 4
    assert {row["relation"] for row in r["known_by_relation"]} == {f.relation for f in facts} | {"all"}
    assert r["enrich_source"] == "long" and 1 <= r["n_enrich"] <= params["N_ENRICH"]
    assert r["claims"]["claim_sink"]["outcome"] != "no_variant"  # SmolLM2 adds no BOS: both protocols ran
    items = {row["item"]: row["this run"] for row in r["paper_items"]}
    assert any(v.startswith("24 facts, 4 relations") for v in items.values())
