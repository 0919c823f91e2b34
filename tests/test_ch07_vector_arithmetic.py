"""Chapter 7 (vector arithmetic): properties its recorded results must have, whatever the model shows."""

import math

import pytest
from claimcheck import assert_claims

pytestmark = pytest.mark.chapters


def _rate(v):
    return v is None or (isinstance(v, float) and math.isnan(v)) or 0.0 <= v <= 1.0


def test_smoke_results(smoke_run):
    run = smoke_run("07_vector_arithmetic")
    results, params = run.results, run.params
    n = results["n_layers"]
    assert results["model"] == params["MODEL"]
    assert len(results["relations"]) >= 2
    for i, rel in enumerate(results["relations"], start=1):
        k = f"rel{i}"
        assert results[f"{k}_name"] == rel
        assert results[f"{k}_prompts"] == params["N_ITEMS"]
        assert 0 <= results[f"{k}_layer"] < n
        assert 2 <= results[f"{k}_usable"] <= results[f"{k}_prompts"]
        # the vector's sources are never among the prompts it is tested on
        assert 1 <= results[f"{k}_n_eval"] <= results[f"{k}_usable"] - 1
        assert 0 <= results[f"{k}_copy_n"] <= results[f"{k}_n_eval"]
        for m in ["accuracy", "switch_rate", "mlp_switch_rate", "remove_reverted", "remove_lost", "subtract_reverted",
                  "subtract_lost", "swap_answer", "random_answer", "copy_answer", "copy_random"]:
            assert _rate(results[f"{k}_{m}"]), (m, results[f"{k}_{m}"])
        for curve in results[f"{k}_sweep"].values():
            assert len(curve) == n and all(0.0 <= x <= 1.0 for x in curve)
    edits = results["edits"]
    assert {e["edit"] for e in edits} == {"remove own MLP write", "subtract relation vector", "swap in relation vector",
                                          "swap in random vector"}


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("07_vector_arithmetic"))
