"""Chapter 6 (task vectors): properties its recorded results must have, whatever the model shows."""

import pytest

from claimcheck import assert_claims

pytestmark = pytest.mark.chapters


def test_smoke_results(smoke_run):
    run = smoke_run("06_task_vectors")
    results, params = run.results, run.params
    n = results["n_layers"]
    assert results["model"] == params["MODEL"]
    assert results["tasks"] == ["my_antonyms", "my_country_capital", "my_letters"]  # the user-style task file
    assert results["n_tasks"] == len(results["table"]) == 3
    n_test, n_val = results["n_test_per_task"], results["n_val_per_task"]
    assert n_test["my_antonyms"] == n_test["my_country_capital"] == params["N_TEST"]
    # 12 letters cannot hold N_VAL + N_TEST + a pool of N_SHOTS + N_DUMMY + 1: the pool keeps what it
    # needs and the rest is split between validation and test in the proportion N_VAL : N_TEST
    pool = params["N_SHOTS"] + params["N_DUMMY"] + 1
    assert n_val["my_letters"] + n_test["my_letters"] == 12 - pool and 1 <= n_test["my_letters"] < params["N_TEST"]
    for row in results["table"]:
        assert 0 <= row["layer"] < n
        for c in ["baseline", "task vector", "ICL", "baseline (greedy)", "task vector (greedy)", "ICL (greedy)"]:
            assert 0.0 <= row[c] <= 1.0
            k = n_test[row["task"]]  # a fraction of the task's test queries
            assert abs(row[c] * k - round(row[c] * k)) < 1e-6
    for t, curve in results["val_curves"].items():
        assert len(curve) == n and all(0.0 <= x <= 1.0 for x in curve)
        row = next(r for r in results["table"] if r["task"] == t)
        assert curve[row["layer"]] == max(curve), "the layer is the best on validation"
    for key in ["acc_baseline", "acc_task_vector", "acc_icl", "acc_fv", "acc_fv_tv"]:
        assert 0.0 <= results[key] <= 1.0
    assert 0.0 <= results["tv_layer_relative"] <= 1.0
    assert results["fv_n_tasks"] == len(results["fv_table"]) == 2
    assert results["fv_shots"] == params["FV_SHOTS"] and results["fv_corrupted"] == params["FV_CORRUPTED"]
    for fv, row in zip(results["fv_table"], results["table"]):
        assert fv["task"] == row["task"]
        assert fv["FV heads"] in params["FV_HEADS"] and 0 <= fv["FV layer"] < n
        assert fv["task vector"] == pytest.approx(row["task vector"])
    # one ranking for all tasks (the mean effect), and each task's own top heads for the overlap
    assert len(results["fv_heads_mean"]) == 10 and set(results["fv_top_heads"]) == set(params["FV_TASKS"])
    claims = results["claims"]
    # the bfloat16 copy against float32: the same first validation queries of every task, every layer
    pc = results["tv_precision"]
    assert results["tv_dtype"] == params["TV_DTYPE"] == "bfloat16"
    assert pc["n_queries"] == sum(min(params["PRECISION_N"], k) for k in n_val.values())
    assert len(pc["curve_exact"]) == len(pc["curve_fast"]) == n and 0.0 <= pc["agreement"] <= 1.0
    gap = max(abs(a - b) for a, b in zip(pc["curve_exact"], pc["curve_fast"]))
    assert pc["max_difference"] == pytest.approx(gap)
    assert pc["curve_exact"][pc["layer_exact"]] == max(pc["curve_exact"])
    assert pc["curve_fast"][pc["layer_fast"]] == max(pc["curve_fast"])
    assert 0.0 <= pc["prob_difference"] <= 1.0
    expected = "small" if pc["agreement"] >= 0.95 else "large"
    assert claims["claim_tv_precision"]["outcome"] == expected
    assert claims["claim_fv_heads_shared"]["outcome"] in ("beyond_chance", "chance", "none")
    assert claims["claim_letters_vs_paper"]["outcome"] == "no_letters"  # the smoke file's letters are its own


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("06_task_vectors"))
