"""Chapter 4 (activation addition): properties its recorded results must have, whatever the model shows."""

import math

import pytest
import torch

from claimcheck import assert_claims

pytestmark = pytest.mark.chapters


def test_smoke_results(smoke_run):
    run = smoke_run("04_activation_addition")
    r, params = run.results, run.params
    assert r["model"] == params["MODEL"]
    assert r["sweep_layers"] == sorted(params["LAYERS"])
    assert r["coeffs"] == [float(c) for c in params["COEFFS"]]
    shape = (len(r["sweep_layers"]), len(r["coeffs"]))
    for key in ("sentiment_effect", "topic_rate", "ppl_ratio_sentiment", "ppl_ratio_topic"):
        grid = r[key]
        assert (len(grid), len(grid[0])) == shape, key
        assert all(math.isfinite(x) for row in grid for x in row), key
    assert r["zero_coeff_max_diff"] == 0.0, "a zero coefficient must change nothing"
    assert all(0.0 <= x <= 1.0 for row in r["topic_rate"] for x in row)
    assert 0.0 <= r["topic_rate_base"] <= 1.0
    assert all(x > 0 for row in r["ppl_ratio_sentiment"] + r["ppl_ratio_topic"] for x in row)
    assert r["ppl_base"] > 1.0
    for name in ("sentiment", "topic"):
        assert r[f"{name}_layer"] in r["sweep_layers"] and r[f"{name}_coeff"] in r["coeffs"]
        if r[f"{name}_within_budget"]:
            assert r[f"{name}_ppl_ratio"] <= params.get("MAX_PPL_RATIO", 1.25)
    assert r["sentiment_effect_best"] <= r["sentiment_effect_max"] + 1e-9
    assert r["topic_rate_best"] <= r["topic_rate_max"] + 1e-9
    # items 1-3 of issue 13: pair words left out, choice on selection prompts, report on held-out ones
    assert "love" in " ".join(r["words_removed"]["positive"]) and r["words_removed"]["negative"]
    for key in ("sentiment_selection_kept", "sentiment_heldout_kept", "sentiment_heldout_all",
                "topic_selection_kept", "topic_heldout_kept", "topic_unsteered_heldout_kept"):
        v, lo, hi = r[key]
        assert lo <= v <= hi, key
    assert r["sentiment_selection_kept"][0] == pytest.approx(r["sentiment_effect_best"])
    assert r["topic_selection_kept"][0] == pytest.approx(r["topic_rate_best"])
    assert "Yesterday after work I" in r["prompts_shortened"]
    # the sweeps ran on a copy in STEER_DTYPE, compared with float32 on the first selection prompts
    pc, outcome = r["steer_precision"], r["claims"]["claim_steer_precision"]["outcome"]
    assert r["steer_dtype"] == params.get("STEER_DTYPE", "bfloat16")
    on_gpu = torch.cuda.is_available() and params.get("DEVICE", "auto") != "cpu"  # models load in bfloat16 there
    if r["steer_dtype"] == ("bfloat16" if on_gpu else "float32"):  # no copy: nothing to compare
        assert not pc and outcome == "exact"
    elif params.get("PRECISION_N", 4) == 0:
        assert not pc and outcome == "unchecked"
    else:
        assert 1 <= pc["n_prompts"] <= params.get("PRECISION_N", 4)
        assert pc["n_configs"] == shape[0] * shape[1]
        # the copy really ran (it differs from float32) and stays within the sweep's own noise and the budget
        assert 0 < pc["sentiment_max_difference"] < pc["sentiment_half_width"]
        assert 0 < pc["ppl_max_log_difference"] < math.log(params.get("MAX_PPL_RATIO", 1.25))
        assert outcome in ("small", "large")
    n = params["N_EXAMPLE_SAMPLES"]
    assert len(r["examples"]) == 2 * 2 * n
    assert sum(e["steering"] == "none" for e in r["examples"]) == 2 * n


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("04_activation_addition"))
