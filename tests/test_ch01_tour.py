"""Chapter 1 (the tour): properties its recorded results must have, whatever the model shows."""

import pytest

from claimcheck import assert_claims

pytestmark = pytest.mark.chapters


def test_smoke_results(smoke_run):
    run = smoke_run("01_tour")
    results, params = run.results, run.params
    n = results["n_layers"]
    assert results["model"] == params["MODEL"]
    assert -1 <= results["emergence_layer"] < n
    facts = results["lens_facts"]
    assert len(facts) == len(params["FACTS"]) * len(params["LENS_MODELS"])
    for row in facts:
        assert 0.0 <= row["p(answer) at output"] <= 1.0
        assert -1 <= row["emergence layer"] < n
    summary = {r["model"]: r for r in results["lens_summary"]}
    assert set(summary) == set(params["LENS_MODELS"])
    for r in summary.values():
        assert 0 <= r["answered"] <= r["facts"] == len(params["FACTS"])
    for key in ("patch_subject_flip_layers", "patch_last_flip_layers"):
        assert all(0 <= l < n for l in results[key])
    assert 0.0 <= results["p_answer_clean"] <= 1.0


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("01_tour"))
