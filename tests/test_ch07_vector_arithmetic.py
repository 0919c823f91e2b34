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
        # held out: the layer and the vector come from the selection half, every edit is scored on the report half
        assert results[f"{k}_n_select"] + results[f"{k}_n_report"] == results[f"{k}_prompts"]
        assert 1 <= results[f"{k}_n_eval"] <= results[f"{k}_n_report"]
        assert 1 <= results[f"{k}_select_usable"] <= results[f"{k}_n_select"]
        assert results[f"{k}_select_usable"] + results[f"{k}_n_eval"] == results[f"{k}_usable"]
        assert results[f"{k}_layer_how"] in ("switch", "gain", "given")
        assert 0 <= results[f"{k}_copy_n"] <= results[f"{k}_n_eval"]
        for m in ["accuracy", "switch_rate", "mlp_switch_rate", "remove_reverted", "remove_lost", "subtract_reverted",
                  "subtract_lost", "swap_answer", "random_answer", "cross_answer", "remove_answer", "copy_answer",
                  "copy_random", "copy_band_answer", "copy_band_random", "copy_band_any", "copy_band_any_random"]:
            assert _rate(results[f"{k}_{m}"]), (m, results[f"{k}_{m}"])
        # the paired flags: the same prompts under every condition, and the recorded differences follow from them
        paired = results[f"{k}_paired"]
        assert set(paired) == {"swap", "remove", "random", "cross"}
        assert all(len(v) == results[f"{k}_n_eval"] and set(v) <= {0, 1} for v in paired.values())
        assert sum(paired["swap"]) / len(paired["swap"]) == pytest.approx(results[f"{k}_swap_answer"])
        for c in ("remove", "cross", "random"):
            diff = (sum(paired["swap"]) - sum(paired[c])) / len(paired["swap"])
            assert results[f"{k}_swap_minus_{c}"] == pytest.approx(diff)
        assert results[f"{k}_cross_name"] in results["relations"] and results[f"{k}_cross_name"] != rel
        for curve in results[f"{k}_sweep"].values():
            assert len(curve) == n and all(0.0 <= x <= 1.0 for x in curve)
    # the copy band sits at the demo's relative depth and ends at the last layer
    from lmbook.experiments.arithmetic import demo_band

    assert [results["band_first"], results["band_last"]] == [demo_band(n)[0], n - 1]
    edits = results["edits"]
    for rel in results["relations"]:
        assert {e["edit"] for e in edits if e["relation"] == rel} == {
            "remove own MLP write", "subtract relation vector", "swap in relation vector", "swap in random vector",
            *(f"swap in {o} vector" for o in results["relations"] if o != rel)}


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("07_vector_arithmetic"))
