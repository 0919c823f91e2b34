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
    n_steps = max(params["FT_STEPS"], params["FT_CURVE_STEPS"])
    assert len(r["ft_losses"]) == n_steps, "the run trains on to FT_CURVE_STEPS to draw the cost curve"
    steps = [c["step"] for c in r["ft_curve"]]
    assert steps[0] == 0 and steps[-1] == n_steps and params["FT_STEPS"] in steps and steps == sorted(steps)
    assert r["ft_curve"][0]["ppl_ratio"] == 1.0, "step 0 is the original model"
    assert all(0.0 <= c[k] <= 1.0 for c in r["ft_curve"] for k in ("harmful", "harmless"))
    kept = next(c for c in r["ft_curve"] if c["step"] == params["FT_STEPS"])
    assert math.isclose(r["ft_ppl_ratio"], kept["ppl_ratio"], rel_tol=1e-3), \
        "the model keeps the weights of step FT_STEPS"
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
    # controls of matched norm: the same requests, a paired advantage with its interval
    ctl = {(c["intervention"], c["direction"]): c for c in r["controls"]}
    assert {"chosen", "random"} <= {d for _, d in ctl}
    for (job, d), c in ctl.items():
        assert c["n"] == params["N_TEST"]
        if d != "chosen":
            assert c["low"] <= c["advantage"] <= c["high"] and -1.0 <= c["advantage"] <= 1.0
    # coherence: every condition's replies scored
    conds = {(c["condition"], c["requests"]) for c in r["coherence"]}
    assert {("original", "harmful"), ("fine-tuned", "harmless"), ("ablated", "harmful"),
            ("added", "harmless"), ("random ablated", "harmful")} <= conds
    assert all(0.0 <= c["degenerate"] <= 1.0 for c in r["coherence"])
    assert r["finding"]["verdict"] in {"reproduced", "partly", "not", "no_data"}
    # selection ran on an INFER_DTYPE copy; its scores rescored in float32 on PRECISION_N validation requests
    prec, outcome = r["score_precision"], r["claims"]["claim_score_precision"]["outcome"]
    if params.get("INFER_DTYPE", "bfloat16") == "float32" or prec is None:  # no copy (or on a GPU, in bf16)
        assert prec is None and outcome == "exact"
    else:
        assert prec["n_requests"] == min(params.get("PRECISION_N", 8), params["N_VAL"])
        assert set(prec["conditions"]) == {"harmful", "harmful, ablated", "harmless", "harmless, added"}
        assert 0.0 < prec["max_difference"] < 1.0, "a bfloat16 copy moves the log-odds, but by little"
        assert outcome == ("small" if prec["max_difference"] <= 0.1 * prec["half_width"] else "large")

    # every refusal rate comes from replies generated on the INFER_DTYPE copy; the first PRECISION_N held-out
    # requests of four conditions are generated again in float32 and compared reply by reply
    gp, outcome = r["reply_precision"], r["claims"]["claim_reply_precision"]["outcome"]
    if params.get("INFER_DTYPE", "bfloat16") == "float32" or (gp is None and outcome == "exact"):
        assert gp is None and outcome == "exact"
    elif params.get("PRECISION_N", 8) == 0:
        assert gp is None and outcome == "unchecked"
    else:
        k = min(params.get("PRECISION_N", 8), params["N_TEST"])
        conds = gp["conditions"]
        assert set(conds) == {"fine-tuned (harmful)", "fine-tuned (harmless)", "ablated (harmful)",
                              "added (harmless)"}
        assert all(c["n"] == k for c in conds.values()) and gp["n_replies"] == 4 * k and gp["n_requests"] == k
        for c in conds.values():
            assert abs(c["refused_fast"] - c["refused_exact"]) <= c["changed"] <= c["n"]
            assert 0 <= c["identical"] <= c["n"] and (c["identical"] < c["n"] or c["changed"] == 0)
        assert gp["changed"] == sum(c["changed"] for c in conds.values())
        assert gp["identical"] == sum(c["identical"] for c in conds.values())
        if k == params["N_TEST"]:  # the copy's side is the chapter's own replies: its counts are the recorded rates
            for name, key in [("fine-tuned (harmful)", "ft_refusal_harmful"),
                              ("fine-tuned (harmless)", "ft_refusal_harmless"),
                              ("ablated (harmful)", "ablated_refusal_harmful"),
                              ("added (harmless)", "added_refusal_harmless")]:
                assert conds[name]["refused_fast"] == round(r[key] * k), name
        assert outcome == ("small" if gp["changed"] <= 0.1 * gp["n_replies"] else "large")
    # the weight-edit check compares two float32 generations, so it does not inherit the copy's differences
    if r["weight_edit_max_diff"] == r["weight_edit_max_diff"]:  # nan: a model with post-sublayer norms
        assert r["weight_edit_same_replies"] == 1.0 and r["weight_edit_max_diff"] < 1e-3


def test_smoke_claims(smoke_run):
    """Every claim has a computed outcome; the glued sentence is the one the outcome selects."""
    assert_claims(smoke_run("05_refusal_direction"))
