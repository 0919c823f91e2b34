"""lmbook.experiments.causal_tracing (chapter 2, ROME): corrupt the subject, restore one state at a time."""

import numpy as np
import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode, token_span
from lmbook.data.facts import Fact, answer_token_ids
from lmbook.experiments.causal_tracing import (
    EMPTY_SUMMARY,
    KINDS,
    CausalTracingRun,
    causal_trace,
    run_causal_tracing,
    subject_embedding_std,
)
from lmbook.mechanisms.knockout import POSITIONS, position_index

from conftest import PROMPTS

SUBJECTS = ["eiffel tower", "michael jordan", "italy"]
FACTS = [Fact(str(i), "r", s, p.replace(s, "{}"), p, a)
         for i, (s, p, a) in enumerate(zip(SUBJECTS, PROMPTS, ["paris", "basketball", "rome"]))]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_zero_noise_gives_back_the_clean_probability(family, tiny_models):
    model = tiny_models[family]
    b = encode(model, PROMPTS[:1])
    r = causal_trace(model, b, (2, 4), 10, noise=0.0, samples=2, window=2)
    assert r.p_corrupt == pytest.approx(r.p_clean, abs=1e-6)
    for eff in r.effects.values():
        assert eff.abs().max() < 1e-5


def test_restoring_the_last_state_restores_the_output(llama):
    b = encode(llama, PROMPTS[:1])
    last = int(b.last[0])
    r = causal_trace(llama, b, (2, 4), 10, noise=5.0, samples=3, window=1, positions=[2, last])
    assert abs(r.p_corrupt - r.p_clean) > 1e-4, "noise must change the output for this test to mean anything"
    # the residual stream after the last layer at the last position determines the output exactly
    assert r.effects["hidden"][-1, 1].item() == pytest.approx(r.p_clean - r.p_corrupt, abs=1e-5)
    assert r.effects["hidden"].shape == (llama.num_layers, 2)


def test_subject_embedding_std_is_positive(llama):
    b = encode(llama, PROMPTS)
    spans = torch.tensor([token_span(b, i, s) for i, s in enumerate(SUBJECTS)])
    assert subject_embedding_std(llama, b, spans) > 0


def test_run_causal_tracing_collects_each_fact(llama):
    run = run_causal_tracing(llama, FACTS, noise_factor=3.0, samples=2, window=2, seed=0, progress=False)
    assert isinstance(run, CausalTracingRun) and set(run.effects) == set(KINDS)
    assert run.effects["mlp"].shape == (3, llama.num_layers, len(POSITIONS))
    assert np.isnan(run.effects["hidden"][2, :, 2]).all() and not np.isnan(run.effects["hidden"][0]).any()
    # fact 1 is the single-fact trace with seed 0 + 1, restoring the positions that prompt has
    b = encode(llama, PROMPTS)
    spans = torch.tensor([token_span(b, i, s) for i, s in enumerate(SUBJECTS)])
    one = causal_trace(llama, b.select([1]), tuple(spans[1].tolist()), int(answer_token_ids(llama, FACTS)[1]),
                       run.noise, samples=2, window=2, positions=position_index(b, spans)[1].tolist(), seed=1)
    np.testing.assert_allclose(run.effects["attention"][1], one.effects["attention"].numpy(), atol=1e-6)
    assert run.p_clean[1] == pytest.approx(one.p_clean)
    assert run.noise == pytest.approx(3.0 * subject_embedding_std(llama, b, spans))
    s = run.summary()
    assert set(EMPTY_SUMMARY) <= set(s) and s["p_clean"] == pytest.approx(run.p_clean.mean())
    assert s["mlp_subject_last_peak"] == pytest.approx(np.nanmax(run.average_effect("mlp")[:, 1]))
    assert s["attention_peak_position"] in POSITIONS
    with pytest.raises(ParameterError, match="at least one fact"):
        run_causal_tracing(llama, [])


def test_peak_layer_and_corruption_drop():
    F, L = 12, 8
    eff = {k: np.zeros((F, L, 4)) for k in ("hidden", "mlp", "attention")}
    eff["mlp"][:, 2, POSITIONS.index("subject last")] = 0.3
    eff["attention"][:, 6, POSITIONS.index("last")] = 0.2
    eff["attention"][:, :, POSITIONS.index("after subject")] = np.nan
    run = CausalTracingRun(eff, np.full(F, 0.6), np.linspace(0.1, 0.2, F), 1.0)
    assert run.peak_layer("mlp", "subject last", n_boot=100).value == 2
    assert run.peak_layer("attention", "last", n_boot=100).value == 6
    assert run.peak_layer("attention", "after subject", n_boot=100).missing
    d = run.corruption_drop(n_boot=100)
    assert d.low > 0 and d.value == pytest.approx(0.45)
    one = CausalTracingRun({k: v[:1] for k, v in eff.items()}, np.full(1, 0.6), np.full(1, 0.1), 1.0)
    assert one.peak_layer("mlp", "subject last").missing and one.corruption_drop().missing
