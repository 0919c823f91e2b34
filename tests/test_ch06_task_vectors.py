"""Chapter 6 (task vectors): properties its recorded results must have, whatever the model shows."""

import pytest
from claimcheck import assert_claims

pytestmark = pytest.mark.chapters


def test_smoke_results(smoke_run):
    run = smoke_run("06_task_vectors")
    results, params = run.results, run.params
    n = results["n_layers"]
    assert results["model"] == params["MODEL"]
    assert results["tasks"] == ["my_antonyms", "my_country_capital"]  # read from the user-style task file
    assert results["n_tasks"] == len(results["table"]) == 2
    for row in results["table"]:
        assert 0 <= row["layer"] < n
        for c in ["baseline", "task vector", "ICL", "baseline (greedy)", "task vector (greedy)", "ICL (greedy)"]:
            assert 0.0 <= row[c] <= 1.0
            # a fraction of N_TEST queries
            assert abs(row[c] * params["N_TEST"] - round(row[c] * params["N_TEST"])) < 1e-6
    for t, curve in results["val_curves"].items():
        assert len(curve) == n and all(0.0 <= x <= 1.0 for x in curve)
        row = next(r for r in results["table"] if r["task"] == t)
        assert curve[row["layer"]] == max(curve), "the layer is the best on validation"
    for key in ["acc_baseline", "acc_task_vector", "acc_icl", "acc_fv", "acc_fv_tv"]:
        assert 0.0 <= results[key] <= 1.0
    assert 0.0 <= results["tv_layer_relative"] <= 1.0
    assert results["fv_n_tasks"] == len(results["fv_table"]) == 1
    fv = results["fv_table"][0]
    assert fv["FV heads"] in params["FV_HEADS"] and 0 <= fv["FV layer"] < n
    assert fv["task vector"] == pytest.approx(results["table"][0]["task vector"])


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("06_task_vectors"))
