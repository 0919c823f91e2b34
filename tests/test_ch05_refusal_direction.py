"""Chapter 5 (refusal direction): properties its recorded results must have, whatever the model shows."""

import math

import pytest

from claimcheck import assert_claims

pytestmark = pytest.mark.chapters


def test_smoke_results(smoke_run):
    run = smoke_run("05_refusal_direction")
    r, params = run.results, run.params
    assert r["model"] == params["MODEL"]
    n = r["n_layers"]
    for key in ("orig_refusal_harmful", "orig_refusal_harmless", "ft_refusal_harmful", "ft_refusal_harmless",
                "ablated_refusal_harmful", "added_refusal_harmless"):
        x = r[key]
        assert 0.0 <= x <= 1.0 and (x * params["N_TEST"]).is_integer(), key
    assert r["finetuned"] is True, "the packaged model does not refuse, so 'auto' fine-tunes it"
    assert len(r["ft_losses"]) == params["FT_STEPS"]
    assert 0 <= r["direction_layer"] < n
    assert r["direction_layer"] % params["SELECT_LAYER_STEP"] == 0
    assert r["direction_layer"] < params.get("MAX_LAYER_FRACTION", 0.8) * n
    assert r["direction_position"] < 0
    assert r["ablation_max_cos"] < 1e-3, "directional ablation leaves the residual stream orthogonal to the direction"
    for key in ("ppl_model", "ppl_ablated", "ppl_added", "ppl_original"):
        assert math.isfinite(r[key]) and r[key] > 1.0, key
    assert -1.0 <= r["cos_original_finetuned"] <= 1.0
    table = r["refusal_table"]
    assert all(row["n"] == params["N_TEST"] and 0 <= row["refused"] <= row["n"] for row in table)
    assert all(row["low"] <= row["rate"] <= row["high"] for row in table)
    assert r["refusal_substrings"] and "I'm sorry" in r["refusal_substrings"]


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("05_refusal_direction"))
