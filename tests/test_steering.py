"""Unit tests of lmbook.experiments.steering (chapter 4) on tiny random models."""

import numpy as np
import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode
from lmbook.experiments.steering import (
    PromptSplit,
    SentimentMeasure,
    TopicMeasure,
    choose_setting,
    compare_topic_runs,
    contrast_vector,
    exclude_pair_words,
    log_odds,
    pair_word_stems,
    select_then_report,
    split_prompts,
    steered_generate,
    steered_nll,
    steered_span,
    steered_target_logprobs,
    word_rate,
    word_stem,
)
from lmbook.mechanisms.interventions import hidden_states
from lmbook.mechanisms.likelihood import logits_nll

PROMPTS = ["the eiffel tower is located in the city of", "michael jordan plays the sport of"]


def test_contrast_vector_is_the_difference_of_hidden_states(llama):
    sv = contrast_vector(llama, "paris france", "rome italy", layers=[0, 2])
    assert sv.vectors.shape == (2, 3, llama.hidden_size)  # <bos> + two words

    def states(prompt):  # [layers, positions, d]
        b = encode(llama, prompt)
        return torch.stack([hidden_states(llama, b, [0, 2], torch.tensor([p]))[:, 0] for p in range(3)], 1)

    torch.testing.assert_close(sv.vectors, states("paris france") - states("rome italy"), rtol=1e-5, atol=1e-5)
    assert sv.vectors[:, 0].abs().max() < 1e-6, "both prompts share <bos>"


def test_contrast_pair_of_unequal_length_is_padded(llama):
    sv = contrast_vector(llama, "the city", "the big red city", layers=[1])
    assert sv.vectors.shape[1] == 5
    assert len(sv.positive_tokens) == len(sv.negative_tokens) == 5


def test_zero_coefficient_changes_nothing(gen_models):
    for model in gen_models:
        sv = contrast_vector(model, "paris", "rome", layers=[0, 1])
        targets = torch.arange(10)
        lp = steered_target_logprobs(model, PROMPTS, sv, [(None, 0.0), (0, 0.0), (1, 0.0), (1, 3.0)], targets)
        assert torch.equal(lp[0], lp[1]) and torch.equal(lp[0], lp[2])
        assert not torch.allclose(lp[0], lp[3])
        # ... and equals the unsteered model's own log-probabilities
        from lmbook.mechanisms.readout import next_token_logprobs as last_token_logprobs

        ref = last_token_logprobs(model, encode(model, PROMPTS))[:, targets]
        torch.testing.assert_close(lp[0], ref, rtol=1e-5, atol=1e-5)


def test_zero_coefficient_reproduces_unsteered_greedy_generation(gen_models):
    for model in gen_models:
        # a pair as long as the prompt, so that steering reaches every prompt position but the last
        sv = contrast_vector(model, "paris france rome italy city capital tower located eiffel",
                             "the a of in is new old big small", layers=[0, 1])
        prompt = PROMPTS[0]
        ids = model.tokenizer(prompt, return_tensors="pt")
        plain = model._model.generate(**ids, max_new_tokens=8, do_sample=False,
                                      pad_token_id=model.tokenizer.pad_token_id)
        plain = model.tokenizer.decode(plain[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        out = steered_generate(model, prompt, sv, [(1, 0.0), (None, 0.0), (0, 50.0)], max_new_tokens=8, sample=False)
        assert out[0] == out[1] == plain
        assert out[2] != plain, "a large coefficient should change a tiny model's greedy continuation"


def test_batched_steering_matches_one_config_at_a_time(llama):
    sv = contrast_vector(llama, "paris france", "rome italy", layers=[0, 1, 2])
    configs = [(0, 2.0), (2, -1.0), (1, 0.5)]
    together = steered_target_logprobs(llama, PROMPTS, sv, configs, torch.arange(20), max_rows=2)
    for i, c in enumerate(configs):
        alone = steered_target_logprobs(llama, PROMPTS, sv, [c], torch.arange(20))
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-5)


def test_steering_adds_only_at_the_first_positions(llama):
    """Steering after the last layer changes only the logits at the steered positions; of the scored
    tokens (those after the span) only the first, predicted from the span's last position, moves."""
    sv = contrast_vector(llama, "paris", "rome", layers=[2])  # n = 2 positions: <bos>, word
    text = ["the eiffel tower is located in the city of"]
    batch = encode(llama, text)
    s0, c0 = steered_nll(llama, text, sv, [(2, 0.0)])
    s1, c1 = steered_nll(llama, text, sv, [(2, 5.0)])
    assert torch.equal(c0, c1) and int(c0) == int(batch.last[0]) - 1
    h = hidden_states(llama, batch, [2], torch.tensor([1]))[0, 0]
    hf = llama._model
    tok2 = batch.input_ids[0, 2]
    nll = [-hf.lm_head(hf.model.norm(x)).log_softmax(-1)[tok2] for x in (h, h + 5.0 * sv.at(2)[1])]
    torch.testing.assert_close(s1 - s0, (nll[1] - nll[0]).reshape(1, 1), rtol=1e-4, atol=1e-4)


def test_steered_nll_matches_logits_nll_unsteered(llama):
    sv = contrast_vector(llama, "paris", "rome", layers=[1])
    batch = encode(llama, PROMPTS)
    s, c = steered_nll(llama, PROMPTS, sv, [(None, 0.0)], max_tokens=8)
    logits = llama._model(**batch.inputs()).logits
    mask = batch.attention_mask[:, 1:].clone()
    mask[:, :1] = 0
    ref = logits_nll(logits, batch.input_ids, mask).sum(-1)
    torch.testing.assert_close(s[0], ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(c[0], mask.sum(-1))


def test_bad_configs_are_rejected(llama):
    sv = contrast_vector(llama, "paris", "rome", layers=[1])
    with pytest.raises(ParameterError, match="no steering vector"):
        steered_target_logprobs(llama, PROMPTS, sv, [(2, 1.0)], torch.arange(3))
    with pytest.raises(ParameterError):
        steered_target_logprobs(llama, PROMPTS, sv, [], torch.arange(3))
    with pytest.raises(ParameterError, match="out of range"):
        contrast_vector(llama, "paris", "rome", layers=[7])




def test_log_odds_and_word_rate():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    torch.testing.assert_close(log_odds(lp, [0], [1, 2]), torch.log(torch.tensor([0.5 / 0.375])))
    texts = ["The bride and groom's wedding.", "", "Nothing here"]
    rate, hits, totals = word_rate(texts, ["wedding", " bride", "groom"])
    assert hits == [2, 0, 0] and totals == [5, 0, 2]  # "groom's" is one word, not "groom"
    assert rate == pytest.approx(2 / 7)


@pytest.fixture(scope="module")
def gen_models(tiny_models):
    return [tiny_models["llama"], tiny_models["gemma3"]]




def test_steered_nll_with_a_prefix_scores_the_whole_text(llama):
    sv = contrast_vector(llama, "paris france", "rome italy", layers=[1])  # 3 positions
    text = "the eiffel tower is located in the city of"
    s, c = steered_nll(llama, [text], sv, [(None, 0.0), (1, 4.0)], prefix="a big red city")
    assert c.tolist() == [[9], [9]]  # every word of the text
    # unsteered, the prefixed score equals the model's loss on the text's tokens after the prefix
    b = encode(llama, "a big red city " + text)
    logits = llama._model(**b.inputs()).logits
    mask = b.attention_mask[:, 1:].clone()
    mask[:, :4] = 0
    torch.testing.assert_close(s[0], logits_nll(logits, b.input_ids, mask).sum(-1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(s[0], s[1])
    with pytest.raises(ParameterError, match="prefix"):
        steered_nll(llama, [text], sv, [(1, 1.0)], prefix="a")


def test_choose_setting_respects_the_fluency_budget():
    effect = [[1.0, 5.0], [2.0, 9.0]]
    ratio = [[1.0, 1.5], [1.1, 3.0]]
    b = choose_setting(effect, ratio, [3, 7], [4.0, 16.0], max_ratio=1.6)
    assert (b["layer"], b["coefficient"], b["effect"], b["within budget"]) == (3, 16.0, 5.0, True)
    # nothing within the budget: the largest effect at the smallest coefficient, flagged
    b = choose_setting(effect, ratio, [3, 7], [4.0, 16.0], max_ratio=0.5)
    assert (b["layer"], b["coefficient"], b["within budget"]) == (7, 4.0, False)
    with pytest.raises(ParameterError, match=r"\[2, 2\]"):
        choose_setting([1.0], [1.0], [3, 7], [4.0, 16.0], max_ratio=1.0)


# --- item 3 of issue 13: the steered span stops before the predicting token ---------------------------------

LONG_PAIR = ("paris france rome italy city capital tower located eiffel jordan sport",
             "the a of in is new old big small red blue")


def test_steered_span_ends_before_the_last_token():
    assert steered_span(8, 20) == 8
    assert steered_span(8, 9) == 8  # positions 0..7, the last token (8) untouched
    assert steered_span(8, 5) == 4  # shortened: positions 0..3 of a 5-token prompt
    assert steered_span(2, 1) == 0


def test_a_long_vector_never_touches_the_last_token(gen_models):
    """Steering after the last layer can change the next-token prediction only through the last
    position; a vector longer than the prompt must leave it alone (the span is shortened)."""
    for model in gen_models:
        last = model.num_layers - 1
        sv = contrast_vector(model, *LONG_PAIR, layers=[0, last])
        assert sv.n_positions > len(encode(model, PROMPTS[1], start=True).input_ids[0])
        lp = steered_target_logprobs(model, PROMPTS, sv, [(None, 0.0), (last, 50.0)], torch.arange(10))
        torch.testing.assert_close(lp[1], lp[0], rtol=1e-5, atol=1e-5)
        plain, steered = steered_generate(model, PROMPTS[1], sv, [(None, 0.0), (last, 50.0)], max_new_tokens=6,
                                          sample=False)
        assert plain == steered
        # at an earlier layer the shortened span still steers
        lp = steered_target_logprobs(model, PROMPTS, sv, [(None, 0.0), (0, 50.0)], torch.arange(10))
        assert not torch.allclose(lp[1], lp[0])


def test_shortened_span_equals_the_truncated_vector(llama):
    """A prompt shorter than the vector is steered exactly as by the vector's first n_tokens - 1 positions."""
    sv = contrast_vector(llama, *LONG_PAIR, layers=[1])
    short = PROMPTS[1]
    n = steered_span(sv.n_positions, len(encode(llama, short, start=True).input_ids[0]))
    cut = type(sv)(sv.layers, sv.vectors[:, :n], sv.positive_tokens[:n], sv.negative_tokens[:n])
    a = steered_target_logprobs(llama, [short], sv, [(1, 3.0)], torch.arange(20))
    b = steered_target_logprobs(llama, [short], cut, [(1, 3.0)], torch.arange(20))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_steered_generate_draws_samples_as_rows(llama):
    sv = contrast_vector(llama, "paris", "rome", layers=[1])
    out = steered_generate(llama, PROMPTS[0], sv, [(None, 0.0), (1, 4.0)], max_new_tokens=3, n_samples=3, seed=1)
    assert len(out) == 6
    assert out == steered_generate(llama, PROMPTS[0], sv, [(None, 0.0), (1, 4.0)], max_new_tokens=3, n_samples=3,
                                   seed=1), "seeded"


# --- item 1: the metric does not count the pair's own words --------------------------------------------------

def test_word_stem_groups_inflections():
    assert {word_stem(w) for w in ["love", " Lovely", "loved", "loving", "lover", "loves"]} == {"lov"}
    assert {word_stem(w) for w in ["hate", "hated", "hateful", "hates"]} == {"hat"}
    assert word_stem("ring") == "ring" and word_stem("bad") == "bad"  # too short to strip


def test_exclude_pair_words_removes_the_pair_and_its_inflections_only():
    words = [" love", " happy", " lovely", " hate", " hated", " awful", " loved"]
    kept, removed = exclude_pair_words(words, [" Love", " Hate"])
    assert removed == [" love", " lovely", " hate", " hated", " loved"]
    assert kept == [" happy", " awful"]
    assert pair_word_stems(["I talk about weddings", "I do not talk"]) >= {"wed", "talk"}
    kept, removed = exclude_pair_words(["wedding", "bride", "weddings", "vows"], ["I talk about weddings"])
    assert removed == ["wedding", "weddings"] and kept == ["bride", "vows"]


# --- item 2: choose on some prompts, report on others ------------------------------------------------------

def test_split_prompts_is_disjoint_seeded_and_complete():
    prompts = [f"prompt {i}" for i in range(10)]
    a = split_prompts(prompts, 0.7, seed=3)
    assert len(a.heldout) == 7 and len(a.select) == 3
    assert not set(a.select) & set(a.heldout) and set(a.select) | set(a.heldout) == set(prompts)
    assert a == split_prompts(prompts, 0.7, seed=3)
    assert len(split_prompts(prompts[:2], 0.99, seed=0).select) == 1  # at least one on each side
    with pytest.raises(ParameterError, match="duplicate"):
        split_prompts(["a", "b", "a"], 0.5, seed=0)
    with pytest.raises(ParameterError, match="at least two"):
        split_prompts(["a"], 0.5, seed=0)


class RecordingMeasure:
    """A fake measure: the effect of a configuration is its coefficient times the layer, plus a
    per-prompt value; records every call's prompts and configurations."""

    def __init__(self, bonus):
        self.bonus, self.calls = bonus, []

    def __call__(self, prompts, configs):
        self.calls.append((list(prompts), list(configs)))
        eff = [[(c * (layer or 0)) + self.bonus.get(p, 0.0) for p in prompts] for layer, c in configs]
        return {"effect": np.array(eff)}

    def effect(self, out):
        return out["effect"].mean(-1)


def test_heldout_report_never_sees_the_selection_prompts():
    split = PromptSplit(select=["s1", "s2"], heldout=["h1", "h2", "h3"])
    ratio = np.ones((2, 2))
    m = RecordingMeasure({})
    r = select_then_report(m, split, [1, 2], [1.0, 3.0], ratio, 1.5, extra_configs=[(1, 0.0)])
    (sel_prompts, sel_configs), (held_prompts, held_configs) = m.calls
    assert sel_prompts == ["s1", "s2"] and held_prompts == ["h1", "h2", "h3"]
    assert len(sel_configs) == 1 + 4 + 1 and held_configs == [(None, 0.0), (2, 3.0)]
    assert (r.choice["layer"], r.choice["coefficient"]) == (2, 3.0) and r.configs[r.index] == (2, 3.0)
    assert r.heldout["effect"].shape == (2, 3) and r.select["effect"].shape == (6, 2)
    # the choice does not depend on the held-out prompts at all
    m2 = RecordingMeasure({"h1": 1e6, "h2": -1e6})
    r2 = select_then_report(m2, split, [1, 2], [1.0, 3.0], ratio, 1.5)
    assert r2.choice == r.choice
    with pytest.raises(ParameterError, match="overlap"):
        select_then_report(m, PromptSplit(["a", "b"], ["b"]), [1], [1.0], np.ones((1, 1)), 1.5)


def test_measures_on_a_tiny_model(llama):
    sv = contrast_vector(llama, "paris", "rome", layers=[1])
    split = split_prompts(PROMPTS + ["the capital of france is", "a tower in paris"], 0.5, seed=0)
    sent = SentimentMeasure(llama, sv, torch.arange(6), {"kept": ([0, 1], [2]), "all": ([0, 1, 3], [2, 4, 5])})
    r = select_then_report(sent, split, [1], [1.0, 4.0], np.ones((1, 2)), 2.0, extra_configs=[(1, 0.0)])
    assert r.select["kept"].shape == (4, 2) and r.heldout["all"].shape == (2, 2)
    assert np.all(r.select["kept"][0] == 0) and np.all(r.select["kept"][-1] == 0), "unsteered / zero coefficient"
    topic = TopicMeasure(llama, sv, {"kept": ["the"], "all": ["the", "a"]}, n_samples=2, max_new_tokens=3)
    out = topic(split.heldout, [(None, 0.0), (1, 4.0)])
    assert out["hits/kept"].shape == out["words"].shape == (2, 2)
    assert np.all(out["hits/kept"] <= out["hits/all"]) and len(out["texts"][0][1]) == 2



# --- the chapter's sweeps run on a bfloat16 copy (lmbook.core.models.load_copy) ---------------------------------

def test_sweeps_on_a_bfloat16_copy(llama):
    """The vector is read in float32 and cast as it is added to the copy's bfloat16 stream: a zero coefficient
    still changes nothing, steering still moves the outputs, and the copy's log-probabilities and losses stay
    close to the float32 model's without equalling them (so it is the copy that ran)."""
    from lmbook.core.models import load_copy, model_dtype

    fast = load_copy(llama, "bfloat16")
    assert model_dtype(fast) == torch.bfloat16
    sv = contrast_vector(llama, "paris france", "rome italy", layers=[0, 1])  # float32, 3 positions
    configs = [(None, 0.0), (1, 0.0), (0, 2.0), (1, 4.0)]
    lp16 = steered_target_logprobs(fast, PROMPTS, sv, configs, torch.arange(10))
    lp32 = steered_target_logprobs(llama, PROMPTS, sv, configs, torch.arange(10))
    assert lp16.dtype == torch.float32 and lp16.shape == lp32.shape
    assert torch.equal(lp16[0], lp16[1]), "a zero coefficient changes nothing on the copy either"
    assert not torch.allclose(lp16[0], lp16[3]), "the cast vector still steers"
    assert (lp16 - lp32).abs().max() < 0.1 and not torch.equal(lp16, lp32)
    text = "the eiffel tower is located in the city of"
    s16, c16 = steered_nll(fast, [text], sv, configs, prefix="a big red city")
    s32, c32 = steered_nll(llama, [text], sv, configs, prefix="a big red city")
    assert torch.equal(c16, c32) and torch.equal(s16[0], s16[1])
    torch.testing.assert_close(s16, s32, rtol=0.02, atol=0.2)
    out = steered_generate(fast, PROMPTS[0], sv, configs, max_new_tokens=3, sample=False)
    assert len(out) == 4 and out[0] == out[1]


def test_compare_topic_runs_pairs_prompts_and_counts_identical_texts():
    """Rates are ratios of sums over prompts; the difference's interval resamples prompts for both runs at once."""
    texts = [[["a b", "c"], ["d", "e f"]], [["g", "h"], ["i", "j"]]]  # [prompts][configs][samples]
    a = {"hits/kept": np.array([[1, 3], [2, 2]]), "words": np.array([[10, 10], [10, 30]]), "texts": texts}
    same = compare_topic_runs(a, a)
    assert same["identical"] == same["n_texts"] == 8
    np.testing.assert_allclose(same["rate_copy"], [0.2, 0.1])
    np.testing.assert_array_equal(same["difference"], np.zeros((2, 3)))
    other = [[["a b", "x"], ["d", "e f"]], [["g", "h"], ["y", "j"]]]
    b = {"hits/kept": np.array([[1, 1], [2, 2]]), "words": np.array([[10, 10], [10, 30]]), "texts": other}
    d = compare_topic_runs(a, b)
    assert d["identical"] == 6
    np.testing.assert_allclose(d["rate_exact"], [0.1, 0.1])
    np.testing.assert_allclose(d["difference"][:, 0], [0.1, 0.0])
    assert d["difference"][0, 1] <= 0.1 <= d["difference"][0, 2] and d["difference"][0, 1] >= 0
    one = compare_topic_runs({k: v[:, :1] if k != "texts" else v[:1] for k, v in a.items()},
                             {k: v[:, :1] if k != "texts" else v[:1] for k, v in b.items()})
    assert one["difference"][0, 0] == 0.0 and np.isnan(one["difference"][0, 1]), "one prompt: no interval"
    with pytest.raises(ParameterError, match="one shape"):
        compare_topic_runs(a, {**b, "words": np.ones((2, 3))})


def test_topic_generation_on_a_bfloat16_copy(llama):
    """The topic measure runs on a copy with the float32 model's seeds: same shapes, and a rerun with the same
    seeds reproduces every sample, on the float32 model and on the copy, so a comparison of the two pairs samples
    drawn from the same random numbers."""
    from lmbook.core.models import load_copy

    fast = load_copy(llama, "bfloat16")
    sv = contrast_vector(llama, "paris france", "rome italy", layers=[1])
    configs = [(None, 0.0), (1, 0.0), (1, 4.0)]
    words = {"kept": ["the", "of", "city"]}
    t16 = TopicMeasure(fast, sv, words, n_samples=3, max_new_tokens=4, seed=5)
    m16 = t16(PROMPTS, configs)
    m32 = TopicMeasure(llama, sv, words, n_samples=3, max_new_tokens=4, seed=5)
    a, b = m32(PROMPTS, configs), m32(PROMPTS, configs)
    assert compare_topic_runs(a, b)["identical"] == 2 * 3 * 3, "same model, same seeds: same samples"
    assert compare_topic_runs(m16, t16(PROMPTS, configs))["identical"] == 18
    c = compare_topic_runs(m16, a)
    assert c["n_texts"] == 18 and c["difference"].shape == (3, 3)
    assert np.all(np.abs(c["difference"][:, 0]) <= 1)
