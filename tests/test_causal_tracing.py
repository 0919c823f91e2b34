"""lmbook.experiments.causal_tracing (chapter 2, ROME): corrupt the subject, restore one state at a time."""

import numpy as np
import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode, token_span
from lmbook.data.facts import Fact, answer_token_ids
from lmbook.experiments.causal_tracing import (
    CATEGORIES,
    EMPTY_SUMMARY,
    KINDS,
    CausalTracingRun,
    _can_start_mid,
    _Hooks,
    causal_trace,
    causal_trace_looped,
    precision_check,
    restoration_window,
    rome_categories,
    run_causal_tracing,
    spread_layers,
    subject_embedding_std,
    trace_layers,
)

from conftest import PROMPTS, one_line

SUBJECTS = ["eiffel tower", "michael jordan", "italy"]
FACTS = [Fact(str(i), "r", s, p.replace(s, "{}"), p, a)
         for i, (s, p, a) in enumerate(zip(SUBJECTS, PROMPTS, ["paris", "basketball", "rome"]))]


def _prompt(model, i=0):
    b = encode(model, PROMPTS, start=True)
    return b.select([i]), tuple(token_span(b, i, SUBJECTS[i]))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_zero_noise_restoring_anything_gives_the_clean_probability(family, tiny_models):
    model = tiny_models[family]
    b, span = _prompt(model)
    every = list(range(int(b.last[0]) + 1))  # every position, the start token included, at every layer
    r = causal_trace(model, b, span, 10, noise=0.0, samples=2, window=2, positions=every)
    assert r.p_corrupt == pytest.approx(r.p_clean, abs=1e-6)
    for eff in r.effects.values():
        assert eff.shape == (model.num_layers, len(every)) and eff.abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batched_cached_path_equals_one_forward_per_restoration(family, tiny_models):
    model = tiny_models[family]
    b, span = _prompt(model)
    kw = dict(samples=3, window=2, seed=4)
    # max_rows=5 splits each position's restorations over several forwards
    fast = causal_trace(model, b, span, 10, 5.0, max_rows=5, **kw)
    plain = causal_trace_looped(model, b, span, 10, 5.0, **kw)
    assert abs(plain.p_corrupt - plain.p_clean) > 1e-4, "the noise must change the output for this test to mean a thing"
    assert fast.positions == plain.positions == list(range(span[0], int(b.last[0]) + 1))
    assert fast.p_clean == pytest.approx(plain.p_clean, abs=1e-6)
    torch.testing.assert_close(fast.p_corrupt_samples, plain.p_corrupt_samples, atol=1e-6, rtol=0)
    for k in KINDS:
        assert plain.effects[k].abs().max() > 1e-5
        torch.testing.assert_close(fast.effects[k], plain.effects[k], atol=1e-6, rtol=0)
    # the same rows over the whole prompt instead of the cached prefix, or every forward from the first
    # layer instead of the one below the first restored layer: the same numbers
    whole = causal_trace(model, b, span, 10, 5.0, cache=False, **kw)
    from_first = causal_trace(model, b, span, 10, 5.0, bands=1, **kw)
    assert _can_start_mid(model), "the tiny model must take the path that starts forwards at a later layer"
    for k in KINDS:
        torch.testing.assert_close(whole.effects[k], fast.effects[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(from_first.effects[k], fast.effects[k], atol=1e-6, rtol=0)


def test_restoring_the_last_state_restores_the_output(llama):
    b, span = _prompt(llama)
    last = int(b.last[0])
    r = causal_trace(llama, b, span, 10, noise=5.0, samples=3, window=1, positions=[span[0], last])
    assert abs(r.p_corrupt - r.p_clean) > 1e-4
    # the residual stream after the last layer at the last position determines the output exactly
    assert r.effects["hidden"][-1, 1].item() == pytest.approx(r.p_clean - r.p_corrupt, abs=1e-5)
    # and at an earlier position it reaches nothing: exactly zero
    assert r.effects["hidden"][-1, 0].item() == 0.0


def test_start_token_is_never_noised(llama):
    b, span = _prompt(llama)
    assert span[0] >= 1 and int(b.input_ids[0, 0]) == llama.tokenizer.bos_token_id
    # what the first layer receives in the corrupted rows of the chapter's path
    seen = []
    with torch.no_grad():
        clean_emb = llama.embed_tokens._module(b.input_ids)
    orig = _Hooks.__enter__

    def spy(self):  # record the embeddings after the noise hook of every forward causal_trace runs
        out = orig(self)
        self.handles.append(self.mods["embed"].register_forward_hook(lambda _m, _a, o: seen.append(o.clone())))
        return out

    _Hooks.__enter__ = spy
    try:
        r = causal_trace(llama, b, span, 10, noise=50.0, samples=2, window=1, positions=[0, span[0]])
    finally:
        _Hooks.__enter__ = orig
    first = seen[0]  # the clean row and the corrupted rows, whole prompt
    assert torch.equal(first[:, 0], clean_emb[:, 0].expand_as(first[:, 0]))
    assert not torch.allclose(first[1:, span[0]], clean_emb[0, span[0]].expand_as(first[1:, span[0]]))
    assert torch.equal(first[1:, span[1]:], clean_emb[0, span[1]:int(b.last[0]) + 1].expand_as(first[1:, span[1]:]))
    # restoring position 0 brings nothing back at any layer: it was never corrupted
    assert r.p_corrupt != pytest.approx(r.p_clean, abs=1e-4)
    for k in KINDS:
        assert r.effects[k][:, 0].abs().max() < 1e-6
    # a subject span that would noise position 0 is refused
    with pytest.raises(ParameterError) as e:
        causal_trace(llama, b, (0, 2), 10, noise=1.0, window=1)
    assert "start token" in one_line(e)


def test_rome_categories_of_a_hand_example():
    # [start] the eiffel tower is located in the city of: subject 2..3, last token 10
    c = rome_categories((2, 4), 10)
    assert c == {"first subject token": [2], "middle subject tokens": [], "last subject token": [3],
                 "first subsequent token": [4], "further tokens": [5, 6, 7, 8, 9], "last token": [10]}
    assert list(c) == list(CATEGORIES)
    # a three-token subject right before the last token: no subsequent or further tokens
    c = rome_categories((1, 4), 4)
    assert c["middle subject tokens"] == [2] and c["first subsequent token"] == [] and c["further tokens"] == []
    # a one-token subject is its own first and last token
    c = rome_categories((3, 4), 6)
    assert c["first subject token"] == c["last subject token"] == [3] and c["further tokens"] == [5]
    with pytest.raises(ParameterError):
        rome_categories((4, 4), 6)


def test_trace_layers_and_restoration_window():
    assert restoration_window(18, 10 / 48) == 4 and restoration_window(30, 10 / 48) == 6
    assert restoration_window(3, 0.01) == 1
    with pytest.raises(ParameterError, match="window_fraction=0"):
        restoration_window(18, 0)
    assert spread_layers(18, 6) == [0, 3, 7, 10, 14, 17] and spread_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert spread_layers(18, 0) == spread_layers(18, 40) == list(range(18)) and spread_layers(5, 1) == [4]
    assert trace_layers(6, 1) == [0, 1, 2, 3, 4, 5]
    assert trace_layers(7, 3) == [0, 3, 6] and trace_layers(8, 3) == [0, 3, 6, 7]
    with pytest.raises(ParameterError, match="layer_stride=0"):
        trace_layers(6, 0)


def test_restoring_only_some_rows_gives_the_same_effects_there_and_nan_elsewhere(llama):
    rows = ("last subject token", "last token")
    full = run_causal_tracing(llama, FACTS, samples=2, window=2, seed=0, progress=False)
    part = run_causal_tracing(llama, FACTS, samples=2, window=2, seed=0, progress=False, rows=rows)
    for c, name in enumerate(CATEGORIES):
        for kind in KINDS:
            if name in rows:
                np.testing.assert_allclose(part.effects[kind][:, :, c], full.effects[kind][:, :, c], atol=1e-6)
            else:
                assert np.isnan(part.effects[kind][:, :, c]).all()
    with pytest.raises(ParameterError, match="rows must be a non-empty subset"):
        run_causal_tracing(llama, FACTS, samples=1, window=2, rows=("subject",), progress=False)


def test_subject_embedding_std_is_positive(llama):
    b = encode(llama, PROMPTS, start=True)
    spans = torch.tensor([token_span(b, i, s) for i, s in enumerate(SUBJECTS)])
    assert subject_embedding_std(llama, b, spans) > 0


def test_run_causal_tracing_collects_each_fact(llama):
    run = run_causal_tracing(llama, FACTS, noise_factor=3.0, samples=2, window=2, seed=0, progress=False)
    assert isinstance(run, CausalTracingRun) and set(run.effects) == set(KINDS)
    assert run.effects["mlp"].shape == (3, llama.num_layers, len(CATEGORIES)) and run.layers == [0, 1, 2]
    b = encode(llama, PROMPTS, start=True)
    spans = torch.tensor([token_span(b, i, s) for i, s in enumerate(SUBJECTS)])
    # "the capital of italy is": a one-token subject has no middle tokens; "is" is subsequent, then the last
    assert np.isnan(run.effects["hidden"][2, :, CATEGORIES.index("middle subject tokens")]).all()
    assert run.category_counts()["further tokens"] == 2
    # fact 1 is the single-fact trace with seed 0 + 1, each category the mean of its positions
    one = causal_trace(llama, b.select([1]), tuple(spans[1].tolist()), int(answer_token_ids(llama, FACTS)[1]),
                       run.noise, samples=2, window=2, seed=1)
    cats = rome_categories(tuple(spans[1].tolist()), int(b.last[1]))
    for c, name in enumerate(CATEGORIES):
        cols = [one.positions.index(p) for p in cats[name]]
        want = one.effects["attention"][:, cols].mean(1).numpy() if cols else np.full(3, np.nan)
        np.testing.assert_allclose(run.effects["attention"][1, :, c], want, atol=1e-6)
    assert run.p_clean[1] == pytest.approx(one.p_clean)
    assert run.noise == pytest.approx(3.0 * subject_embedding_std(llama, b, spans))
    assert run.tokens[1][0] == "<bos>" and len(run.traces) == 3
    s = run.summary()
    assert set(EMPTY_SUMMARY) <= set(s) and s["p_clean"] == pytest.approx(run.p_clean.mean())
    assert s["mlp_subject_last_peak"] == pytest.approx(np.nanmax(run.average_effect("mlp")[:, 2]))
    assert s["attention_peak_position"] in CATEGORIES
    strided = run_causal_tracing(llama, FACTS[:2], samples=2, window=2, layer_stride=2, progress=False)
    assert strided.layers == [0, 2] and strided.effects["hidden"].shape == (2, 2, 6)
    np.testing.assert_allclose(strided.effects["mlp"][:, 1], run.effects["mlp"][:2, 2], atol=1e-6)
    chosen = run_causal_tracing(llama, FACTS[:2], samples=2, window=2, layers=[2, 0], progress=False)
    np.testing.assert_allclose(chosen.effects["attention"], strided.effects["attention"], atol=1e-6)
    with pytest.raises(ParameterError, match="layers must be layers of the model"):
        run_causal_tracing(llama, FACTS[:1], window=2, layers=[3], progress=False)
    with pytest.raises(ParameterError, match="at least one fact"):
        run_causal_tracing(llama, [])
    for kw, bad in ((dict(noise_factor=-1.0), "noise_factor=-1.0"), (dict(samples=0), "samples=0"),
                    (dict(window=9), "window=9"), (dict(layer_stride=0), "layer_stride=0")):
        with pytest.raises(ParameterError) as e:
            run_causal_tracing(llama, FACTS, progress=False, **{"window": 2, **kw})
        assert bad in one_line(e)


def test_noise_std_reruns_the_first_facts_of_a_run_exactly(llama):
    """``noise_std`` and ``head``: the first facts rerun with the run's noise scale are the same trace."""
    run = run_causal_tracing(llama, FACTS, samples=2, window=2, seed=3, progress=False)
    again = run_causal_tracing(llama, FACTS[:2], samples=2, window=2, seed=3, progress=False,
                               noise_std=run.noise)
    assert again.noise == run.noise and run.head(2).n_facts == 2
    for kind in KINDS:
        np.testing.assert_allclose(again.effects[kind], run.head(2).effects[kind], atol=1e-6)
    # measured on its own two facts, the noise scale differs, and so do the effects
    own = run_causal_tracing(llama, FACTS[:2], samples=2, window=2, seed=3, progress=False)
    assert own.noise != pytest.approx(run.noise)
    check = precision_check(run, again, n_boot=200)
    assert check["n_facts"] == 2 and check["max_difference"] < 1e-6 and check["max_effect"] > 0
    assert check["headline_fast"] == pytest.approx(check["headline_exact"], abs=1e-6)
    with pytest.raises(ParameterError, match="noise_std=-1.0"):
        run_causal_tracing(llama, FACTS[:1], window=2, noise_std=-1.0, progress=False)


def test_precision_check_measures_the_largest_map_difference():
    fast, exact = _synthetic(F=12), _synthetic(F=12).head(5)
    exact.effects["mlp"][:, 2, CATEGORIES.index("last subject token")] += 0.02  # exact run 0.02 higher
    check = precision_check(fast, exact, n_boot=200)
    assert check["n_facts"] == 5 and check["max_difference"] == pytest.approx(0.02)
    assert check["max_effect"] == pytest.approx(np.nanmax(np.abs(exact.average_effect("mlp"))))
    assert check["headline_exact"] - check["headline_fast"] == pytest.approx(0.02)
    assert check["half_width"] == 0.0  # most cells are 0 for every fact: their intervals have no width
    for kind in KINDS:  # noise of sd 0.1 over 12 facts: half-widths near 1.96 * 0.1 / sqrt(12) = 0.057
        fast.effects[kind] += np.random.default_rng(1).normal(0, 0.1, fast.effects[kind].shape)
    assert 0.04 < precision_check(fast, exact, n_boot=200)["half_width"] < 0.07
    with pytest.raises(ParameterError, match="first facts, layers and kinds"):
        precision_check(fast.head(3), exact)


def _synthetic(F=12, L=8):
    eff = {k: np.zeros((F, L, 6)) for k in KINDS}
    rng = np.random.default_rng(0)
    eff["mlp"][:, 2, CATEGORIES.index("last subject token")] = 0.3 + 0.05 * rng.standard_normal(F)
    eff["attention"][:, min(6, L - 1), CATEGORIES.index("last token")] = 0.1 + 0.05 * rng.standard_normal(F)
    eff["attention"][:, :, CATEGORIES.index("first subsequent token")] = np.nan
    return CausalTracingRun(eff, np.full(F, 0.6), np.linspace(0.1, 0.2, F), 1.0, list(range(L)), L)


def test_peaks_intervals_and_the_headline():
    run = _synthetic()
    assert run.peak_layer("mlp", "subject last", n_boot=100).value == 2  # chapter 2's alias
    assert run.peak_layer("attention", "last token", n_boot=100).value == 6
    assert run.peak_depth("attention", "last", n_boot=100).value == pytest.approx(6 / 7)
    assert run.peak_layer("attention", "after subject", n_boot=100).missing
    h = run.headline(n_boot=200)
    assert h["mlp_subject_last"].value == pytest.approx(run.effects["mlp"][:, 2, 2].mean())
    assert h["mlp_minus_attention"].low > 0  # 0.3 against 0.1, paired over 12 facts
    assert h["mlp_subject_last_depth"].value == pytest.approx(2 / 7)
    mean, low, high = run.interval("mlp", n_boot=200)
    assert mean.shape == (8, 6) and low[2, 2] < mean[2, 2] < high[2, 2]
    assert np.isnan(run.interval_width("attention", n_boot=50)[:, 3]).all()
    assert run.category_counts("attention")["first subsequent token"] == 0
    d = run.corruption_drop(n_boot=100)
    assert d.low > 0 and d.value == pytest.approx(0.45)
    with pytest.raises(ParameterError, match="unknown position category"):
        run.peak_layer("mlp", "subject middle")
    one = CausalTracingRun({k: v[:1] for k, v in run.effects.items()}, np.full(1, 0.6), np.full(1, 0.1), 1.0,
                           list(range(8)), 8)
    assert one.peak_layer("mlp", "subject last").missing and one.corruption_drop().missing


def test_strided_peak_reports_the_layer_not_the_index():
    run = _synthetic(L=4)
    run.layers, run.n_layers = [0, 3, 6, 9], 10
    assert run.peak_layer("mlp", "last subject token", n_boot=50).value == 6
    assert run.summary()["mlp_subject_last_peak_layer"] == 6 and run.summary()["n_layers_restored"] == 4
