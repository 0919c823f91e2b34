"""Unit tests of lmbook.experiments.steering (chapter 4) on tiny random models."""

import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode
from lmbook.experiments.steering import (
    contrast_vector,
    log_odds,
    steered_generate,
    steered_nll,
    steered_target_logprobs,
    word_rate,
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
        # a pair as long as the prompt, so that steering reaches every prompt position
        sv = contrast_vector(model, "paris france rome italy city capital tower located eiffel",
                             "the a of in is new old big small", layers=[1])
        prompt = PROMPTS[0]
        ids = model.tokenizer(prompt, return_tensors="pt")
        plain = model._model.generate(**ids, max_new_tokens=8, do_sample=False,
                                      pad_token_id=model.tokenizer.pad_token_id)
        plain = model.tokenizer.decode(plain[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        out = steered_generate(model, prompt, sv, [(1, 0.0), (None, 0.0), (1, 50.0)], max_new_tokens=8, sample=False)
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
