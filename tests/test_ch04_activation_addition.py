"""Chapter 4 (activation addition): properties its recorded results must have, whatever the model shows."""

import math

import pytest
import torch

from claimcheck import assert_claims
from lmbook.experiments.steering import split_prompts

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
    # the generations ran on the same copy, compared with float32 on the first held-out topic prompts, same seeds
    gp, outcome = r["gen_precision"], r["claims"]["claim_gen_precision"]["outcome"]
    if r["steer_dtype"] == ("bfloat16" if on_gpu else "float32"):
        assert not gp and outcome == "exact"
    elif params.get("PRECISION_N", 4) == 0:
        assert not gp and outcome == "unchecked"
    else:
        heldout = split_prompts(params["TOPIC_PROMPTS"], params["HELDOUT_FRACTION"], params.get("SEED", 0)).heldout
        n_held = gp["n_prompts"]
        assert n_held == min(len(heldout), params.get("PRECISION_N", 4))
        assert gp["n_texts"] == 2 * n_held * params["N_SAMPLES"] and 0 <= gp["identical"] <= gp["n_texts"]
        for k in ("rate_copy", "rate_float32"):
            assert len(gp[k]) == 2 and all(0.0 <= x <= 1.0 for x in gp[k]), k
        if n_held == len(heldout):  # the copy's rates are the chapter's held-out rates (unsteered, chosen)
            assert gp["rate_copy"] == pytest.approx([r["topic_unsteered_heldout_kept"][0], r["topic_heldout_kept"][0]])
        for (d, lo, hi), a, b in zip(gp["difference"], gp["rate_copy"], gp["rate_float32"]):
            assert d == pytest.approx(a - b) and (lo is None) == (hi is None) == (n_held < 2)
            assert lo is None or lo <= d <= hi
        if gp["identical"] == gp["n_texts"]:
            assert gp["rate_copy"] == gp["rate_float32"]
        assert outcome in ("small", "large")
        assert (outcome == "small") == all(abs(d[0]) <= h for d, h in zip(gp["difference"], gp["heldout_half_width"]))
    n = params["N_EXAMPLE_SAMPLES"]
    assert len(r["examples"]) == 2 * 2 * n
    assert sum(e["steering"] == "none" for e in r["examples"]) == 2 * n


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("04_activation_addition"))
