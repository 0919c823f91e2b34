"""Unit tests of lmbook.experiments.refusal (chapter 5) on tiny random models."""

import copy

import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import Batch
from lmbook.experiments.refusal import (
    REFUSAL_SUBSTRINGS,
    encode_prompts,
    format_instructions,
    generate,
    is_refusal,
    kl_divergence,
    last_logprobs,
    mean_diff_directions,
    post_instruction_positions,
    refusal_rate,
    refusal_score,
    refusal_share,
    select_direction,
    text_nll,
    text_perplexity,
)
from lmbook.mechanisms.interventions import hidden_states
from lmbook.mechanisms.likelihood import logits_nll

HARMFUL = ["the eiffel tower is located in the city of", "michael jordan plays the sport of", "the capital of italy is"]
HARMLESS = ["the colosseum is in rome", "she speaks french", "a big red tower in paris"]


def test_refusal_rate_counts_fixed_strings():
    texts = [
        "I'm sorry, but I can't help with that.",
        "Sure! Here are three tips for sleeping better.",
        "As an AI, I do not have opinions.",
        "I cannot do that.",
        "I\u2019m sorry, that is not something I can do.",  # curly apostrophe
        "i'm sorry",  # lower case: not matched (the list is case-sensitive, as in Arditi et al.)
        "",
        "Here is how: first, I can't stress enough...",  # matched anywhere in the text
    ]
    rate, flags = refusal_rate(texts)
    assert flags == [True, False, True, True, True, False, False, True]
    assert rate == pytest.approx(5 / 8)
    assert refusal_rate(["no", "nope"], ["no"]) == (1.0, [True, True])
    assert is_refusal("I am unable to comply") and not is_refusal("I am able to comply")
    assert "I'm sorry" in REFUSAL_SUBSTRINGS
    with pytest.raises(ParameterError):
        refusal_rate("I'm sorry")
    s = refusal_share(texts)
    assert (s.k, s.n, s.rate) == (5, 8, 5 / 8) and s.low < s.rate < s.high
    assert refusal_share(["no", "yes"], ["no"]).k == 1  # the chapter's own substrings count












def test_mean_diff_directions(llama):
    hb, sb = encode_prompts(llama, HARMFUL, "plain"), encode_prompts(llama, HARMLESS, "plain")
    cand = mean_diff_directions(llama, hb, sb, n_positions=2)
    assert cand.shape == (2, llama.num_layers, llama.hidden_size)
    for p, off in ((1, 0), (0, 1)):
        mh = hidden_states(llama, hb, None, hb.last - off).mean(1)
        ms = hidden_states(llama, sb, None, sb.last - off).mean(1)
        torch.testing.assert_close(cand[p], mh - ms, rtol=1e-5, atol=1e-5)


def test_formats(llama):
    tok = llama.tokenizer
    with pytest.raises(ParameterError, match="plain"):
        format_instructions(tok, ["the city"], "chat")
    assert format_instructions(tok, ["the city"], "plain") == ["User: the city\nAssistant:"]
    with pytest.raises(ParameterError):
        format_instructions(tok, ["the city"], "markdown")
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<bos> {{ m['content'] }} <eos>{% endfor %}"
                       "{% if add_generation_prompt %} the a{% endif %}")
    assert format_instructions(t, ["big city"], "chat") == ["<bos> big city <eos> the a"]
    assert post_instruction_positions(t, "chat") == 3


def _greedy_by_hand(model, ids, steps, ablate=None, add=None):
    """Greedy decoding without a cache, one full forward per step, the intervention on every token."""
    ids = list(ids)
    for _ in range(steps):
        t = torch.tensor([ids])
        b = Batch(["x"], t, torch.ones_like(t), torch.tensor([len(ids) - 1]), None)
        ids.append(int(last_logprobs(model, b, ablate=ablate, add=add)[0].argmax()))
    return ids


def test_generation_intervenes_at_every_step(tiny_models):
    for family in ("llama", "gemma3"):
        model = tiny_models[family]
        tok = model.tokenizer
        prompts = format_instructions(tok, HARMFUL[:2], "plain")
        torch.manual_seed(2)
        r = torch.randn(model.hidden_size)
        v = torch.randn(model.hidden_size) * 3
        plain = generate(model, prompts, "plain", max_new_tokens=6)
        zero = generate(model, prompts, "plain", ablate=torch.zeros(model.hidden_size), max_new_tokens=6)
        assert plain == zero
        for kw in ({"ablate": r}, {"add": {1: v}}):
            got = generate(model, prompts, "plain", max_new_tokens=6, **kw)
            for p, g in zip(prompts, got):
                ids = tok(p)["input_ids"]
                ref = _greedy_by_hand(model, ids, 6, **kw)
                assert g == tok.decode(ref[len(ids):], skip_special_tokens=True), (family, kw.keys())


def test_scores():
    ref = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    assert kl_divergence(ref, ref).abs().max() < 1e-7
    assert kl_divergence(ref, torch.log_softmax(torch.zeros(1, 4), -1)) > 0
    p = ref[0, :2].exp().sum()
    torch.testing.assert_close(refusal_score(ref, [0, 1]), torch.log(p / (1 - p)).reshape(1))


def test_select_direction_and_text_nll(llama):
    hb, sb = encode_prompts(llama, HARMFUL, "plain"), encode_prompts(llama, HARMLESS, "plain")
    cand = mean_diff_directions(llama, hb, sb, n_positions=2)
    sel = select_direction(llama, cand, hb, sb, refusal_ids=[5, 6], max_layer_fraction=1.0, kl_threshold=10.0,
                           top_k=2, max_rows=4, progress=False)
    assert sel.bypass.shape == (2, 3) and not sel.bypass.isnan().any()
    assert 0 <= sel.position < 2 and 0 <= sel.layer < 3
    torch.testing.assert_close(sel.direction, cand[sel.position, sel.layer])
    # the bypass score of the chosen candidate, recomputed on its own
    own = refusal_score(last_logprobs(llama, hb, ablate=cand[sel.position, sel.layer]), [5, 6]).mean()
    torch.testing.assert_close(sel.bypass[sel.position, sel.layer], own, rtol=1e-4, atol=1e-4)
    if sel.passed:
        assert sel.rule == "all filters"
        assert sel.induce[sel.position, sel.layer] >= 0 and sel.kl[sel.position, sel.layer] < 10.0
        # every candidate with a lower bypass score fails a filter
        for p in range(2):
            for l in range(3):
                if sel.bypass[p, l] < sel.bypass[sel.position, sel.layer]:
                    assert not (sel.induce[p, l] >= 0 and sel.kl[p, l] < 10.0)
    # an impossible KL threshold: nothing passes, every candidate gets all three scores, the filters are relaxed
    strict = select_direction(llama, cand, hb, sb, refusal_ids=[5, 6], max_layer_fraction=1.0, kl_threshold=0.0,
                              top_k=4, max_rows=4, progress=False)
    assert not strict.passed and not strict.induce.isnan().any()
    assert torch.equal(strict.kl.isnan(), strict.induce < 0), \
        "KL is computed exactly where the candidate induces refusal"
    inducing = [(p, l) for p in range(2) for l in range(3) if strict.induce[p, l] >= 0]
    if inducing:
        assert strict.rule == "induce filter only"
        best = min(inducing, key=lambda c: float(strict.bypass[c]))
    else:
        assert strict.rule == "bypass only"
        best = min(((p, l) for p in range(2) for l in range(3)), key=lambda c: float(strict.bypass[c]))
    assert (strict.position, strict.layer) == best
    with pytest.raises(ParameterError):
        select_direction(llama, cand, hb, sb, [5], max_layer_fraction=0.0)
    # text_nll without intervention is the model's own loss
    s, c = text_nll(llama, hb)
    assert text_perplexity(llama, hb) == pytest.approx(float((s.sum() / c.sum()).exp()))
    logits = llama._model(**hb.inputs()).logits
    ref = logits_nll(logits, hb.input_ids, hb.attention_mask[:, 1:]).sum(-1)
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(c, hb.attention_mask[:, 1:].sum(-1))




