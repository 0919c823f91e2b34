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
    generate_conditions,
    greedy_reproduces,
    is_degenerate,
    is_refusal,
    kl_divergence,
    last_logprobs,
    matched_random_direction,
    mean_diff_directions,
    post_instruction_positions,
    refusal_rate,
    refusal_score,
    refusal_share,
    repeated_ngram_share,
    reply_nll,
    reply_precision,
    runner_up,
    score_precision,
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


def test_score_precision_compares_the_same_scores_in_two_precisions(llama):
    """``score_precision``: against itself every difference is an exact zero; each condition's mean is
    the refusal score selection reads in that condition; a bfloat16 copy differs, but little."""
    from lmbook.core.models import load_copy

    hb, sb = encode_prompts(llama, HARMFUL, "plain"), encode_prompts(llama, HARMLESS, "plain")
    r = mean_diff_directions(llama, hb, sb, n_positions=1)[0, 1]
    same = score_precision(llama, llama, hb, sb, r, 1, [5, 6])
    assert same["max_difference"] == 0.0 and same["n_requests"] == 3
    c = same["conditions"]
    assert set(c) == {"harmful", "harmful, ablated", "harmless", "harmless, added"}
    for name, kw, b in [("harmful", {}, hb), ("harmful, ablated", {"ablate": r}, hb), ("harmless", {}, sb),
                        ("harmless, added", {"add": {1: r}}, sb)]:
        own = float(refusal_score(last_logprobs(llama, b, **kw), [5, 6]).mean())
        assert c[name]["exact"] == pytest.approx(own, abs=1e-5), name
        assert c[name]["half_width"] > 0.0 and c[name]["max_request_difference"] == 0.0
    assert same["half_width"] == min(x["half_width"] for x in c.values())
    assert c["harmful, ablated"]["exact"] != c["harmful"]["exact"], "the ablation changes the score"
    fast = score_precision(llama, load_copy(llama, "bfloat16"), hb, sb, r, 1, [5, 6])
    assert 0.0 < fast["max_difference"] < 0.5
    for name, x in fast["conditions"].items():
        assert x["exact"] == c[name]["exact"] and abs(x["exact"] - x["fast"]) <= x["max_request_difference"]






def test_reply_precision_compares_replies_prompt_by_prompt(llama):
    """``reply_precision``: against its own replies nothing changes; a reply the copy turned into a
    refusal is one changed flag and one reply that is not identical; a bfloat16 copy is counted
    against the float32 replies of the same prompts."""
    from lmbook.core.models import load_copy

    tok = llama.tokenizer
    prompts = format_instructions(tok, HARMFUL, "plain")
    torch.manual_seed(5)
    r = torch.randn(llama.hidden_size)
    conds = {"none": (prompts, {}), "ablated": (prompts[:2], {"ablate": r})}
    own = generate_conditions(llama, conds, "plain", max_new_tokens=5)
    same = reply_precision(llama, conds, own, "plain", max_new_tokens=5)
    assert same["n_replies"] == 5 and same["n_requests"] == 3
    assert same["changed"] == 0 and same["identical"] == 5 and same["identical_share"] == 1.0
    assert same["conditions"]["ablated"] == {"n": 2, "refused_exact": 0, "refused_fast": 0, "changed": 0,
                                             "identical": 2}
    texts, ids = own["ablated"]
    edited = {**own, "ablated": (["I'm sorry, no.", texts[1]], [[5, 6], ids[1]])}
    one = reply_precision(llama, conds, edited, "plain", max_new_tokens=5)
    assert one["conditions"]["ablated"] == {"n": 2, "refused_exact": 0, "refused_fast": 1, "changed": 1,
                                            "identical": 1}
    assert one["changed"] == 1 and one["changed_share"] == pytest.approx(1 / 5)
    assert one["identical_share"] == pytest.approx(4 / 5)
    # what the chapter does: the copy's replies against float32 replies to the same prompts
    fast = load_copy(llama, "bfloat16")
    fr = generate_conditions(fast, conds, "plain", max_new_tokens=5)
    got = reply_precision(llama, conds, fr, "plain", max_new_tokens=5)
    want = sum(list(a) == list(b) for c in conds for a, b in zip(own[c][1], fr[c][1]))
    assert got["identical"] == want
    with pytest.raises(ParameterError, match="unmatched"):
        reply_precision(llama, conds, {"none": own["none"]}, "plain")
    with pytest.raises(ParameterError, match="one reply per prompt"):
        reply_precision(llama, conds, {**own, "none": (own["none"][0][:1], own["none"][1][:1])}, "plain")


def test_greedy_reproduces_what_generation_gives(tiny_models):
    """``greedy_reproduces``: the replies a generation gives (with its intervention) are reproduced,
    with or without an end before ``max_new_tokens``; a reply with one token changed, one cut short
    without an end token, or the replies of another intervention are not."""
    for family in ("llama", "gemma3"):
        model = tiny_models[family]
        prompts = format_instructions(model.tokenizer, HARMFUL, "plain")
        torch.manual_seed(6)
        r, v = torch.randn(model.hidden_size), torch.randn(model.hidden_size) * 3
        for kw in ({}, {"ablate": r}, {"add": {1: v}}):
            ids = generate(model, prompts, "plain", max_new_tokens=6, return_ids=True, **kw)[1]
            assert greedy_reproduces(model, prompts, ids, "plain", max_new_tokens=6, **kw) == [True] * 3, family
            assert greedy_reproduces(model, prompts, ids, "plain", max_new_tokens=6, max_rows=2, **kw) == [True] * 3
            wrong = [list(x) for x in ids]
            wrong[0][-1] = (wrong[0][-1] + 1) % model.tokenizer.vocab_size if wrong[0] else 0
            short = [x[:-1] if x else [0] for x in ids]
            assert greedy_reproduces(model, prompts, wrong, "plain", max_new_tokens=6, **kw)[0] is False
            assert greedy_reproduces(model, prompts, short, "plain", max_new_tokens=6, **kw) == [False] * 3
        ablated = generate(model, prompts, "plain", max_new_tokens=6, return_ids=True, ablate=r)[1]
        plain = generate(model, prompts, "plain", max_new_tokens=6, return_ids=True)[1]
        assert greedy_reproduces(model, prompts, ablated, "plain", max_new_tokens=6) == [a == b for a, b in
                                                                                        zip(ablated, plain)]
    with pytest.raises(ParameterError, match="one reply per prompt"):
        greedy_reproduces(model, prompts, ablated[:1], "plain")


def test_matched_random_direction_has_the_norm():
    r = torch.randn(16) * 7
    a, b, c = (matched_random_direction(r, s) for s in (0, 0, 1))
    assert a.shape == r.shape and float(a.norm()) == pytest.approx(float(r.norm()), rel=1e-6)
    assert torch.equal(a, b) and not torch.allclose(a, c), "seeded: same seed, same direction"
    assert abs(float(torch.nn.functional.cosine_similarity(a, r, dim=0))) < 0.99
    with pytest.raises(ParameterError):
        matched_random_direction(torch.zeros(2, 3))


def test_runner_up_is_the_best_other_layer():
    from lmbook.experiments.refusal import Selection

    nan = float("nan")
    bypass = torch.tensor([[0.1, nan, 3.0], [-2.0, nan, 0.5]])
    sel = Selection(1, 0, torch.zeros(4), bypass, bypass, bypass, 0.0, 0.0, True, "all filters")
    assert runner_up(sel) == (1, 2), "lowest bypass at a layer other than 0, unscored layers skipped"
    only = Selection(0, 0, torch.zeros(4), torch.tensor([[1.0, nan]]), bypass, bypass, 0.0, 0.0, True, "x")
    assert runner_up(only) is None


def test_repetition_and_degenerate_replies():
    assert repeated_ngram_share("a b c d e f", 2) == 0.0
    # 6 bigrams: (a,b) (b,a) (a,b)* (b,a)* (a,b)* (b,c): 3 repeat an earlier one
    assert repeated_ngram_share("A b a b a b c", 2) == pytest.approx(3 / 6)
    assert repeated_ngram_share("one two", 4) == 0.0
    loop = "Sure, here it is. " * 8
    assert repeated_ngram_share(loop) > 0.8 and is_degenerate(loop)
    prose = "Knead the dough for ten minutes, let it rise for an hour, shape a loaf and bake it until golden."
    assert repeated_ngram_share(prose) == 0.0 and not is_degenerate(prose)
    assert is_degenerate("") and is_degenerate("  \n ")
    assert not is_degenerate("Sorry, but I can't help with that.")
    half = "a b c d e a b c d e"  # 7 four-grams, 2 repeats (a b c d, b c d e)
    assert repeated_ngram_share(half) == pytest.approx(2 / 7)
    assert is_degenerate(half, threshold=0.2) and not is_degenerate(half, threshold=2 / 7)
    with pytest.raises(ParameterError):
        is_degenerate("x", threshold=1.5)


def test_generate_rows_carry_their_own_intervention(llama):
    tok = llama.tokenizer
    prompts = format_instructions(tok, HARMFUL + HARMLESS[:1], "plain")
    torch.manual_seed(3)
    r, v = torch.randn(llama.hidden_size), torch.randn(llama.hidden_size) * 3
    z = torch.zeros(llama.hidden_size)
    # rows: plain, ablated, added, plain
    ab = torch.stack([z, r, z, z])
    ad = {1: torch.stack([z, z, v, z])}
    texts, ids = generate(llama, prompts, "plain", ablate=ab, add=ad, max_new_tokens=5, batch_size=3,
                          return_ids=True)
    assert texts == tok.batch_decode(ids, skip_special_tokens=True)
    assert texts[0] == generate(llama, prompts[:1], "plain", max_new_tokens=5)[0]
    assert texts[1] == generate(llama, prompts[1:2], "plain", ablate=r, max_new_tokens=5)[0]
    assert texts[2] == generate(llama, prompts[2:3], "plain", add={1: v}, max_new_tokens=5)[0]
    assert texts[3] == generate(llama, prompts[3:], "plain", max_new_tokens=5)[0]
    got = generate_conditions(llama, {"none": (prompts[:2], {}), "ablated": (prompts[1:3], {"ablate": r}),
                                      "added": (prompts[2:], {"add": {1: v}})}, "plain", max_new_tokens=5,
                              batch_size=4)
    assert list(got) == ["none", "ablated", "added"]
    assert got["none"][0] == generate(llama, prompts[:2], "plain", max_new_tokens=5)
    assert got["ablated"] == generate(llama, prompts[1:3], "plain", ablate=r, max_new_tokens=5, return_ids=True)
    assert got["added"][0] == generate(llama, prompts[2:], "plain", add={1: v}, max_new_tokens=5)
    with pytest.raises(ParameterError, match="unknown edit"):
        generate_conditions(llama, {"x": (prompts[:1], {"steer": v})}, "plain")


def test_reply_nll_matches_full_forwards(tiny_models):
    for family in ("llama", "gemma3"):
        model = tiny_models[family]
        tok = model.tokenizer
        prompts = format_instructions(tok, HARMFUL, "plain")
        g = torch.Generator().manual_seed(0)
        sets = [[torch.randint(4, len(tok), (k,), generator=g).tolist() for k in (5, 0, 1)],
                [torch.randint(4, len(tok), (k,), generator=g).tolist() for k in (2, 7, 3)]]
        got = reply_nll(model, prompts, sets, "plain", max_rows=2)
        for (s, c), replies in zip(got, sets):
            assert c.tolist() == [len(r) for r in replies]
            for i, (p, r) in enumerate(zip(prompts, replies)):
                ids = tok(p)["input_ids"]
                full = torch.tensor([ids + r])
                lp = model._model(input_ids=full).logits[0].float().log_softmax(-1)
                ref = -sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(r))
                assert float(s[i]) == pytest.approx(ref, abs=1e-3), (family, i)
        with pytest.raises(ParameterError, match="reply set 0 has 1 replies for 3 prompts"):
            reply_nll(model, prompts, [[[5]]], "plain")


@pytest.mark.parametrize("method", ["lora", "layers"])
def test_finetune_keeps_an_earlier_step(tiny_dirs, method):
    """keep_step=k then training on: the model keeps the weights of a k-step fine-tune, and on_step
    saw every step with the model as it was then."""
    from lmbook.core.models import load_model
    from lmbook.mechanisms.training import finetune, reply_loss

    pairs = [("the capital of italy is", " rome"), ("the eiffel tower is in", " paris"),
             ("michael jordan plays", " basketball"), ("she speaks", " french")]
    fresh = lambda: load_model(str(tiny_dirs["llama"]), dtype=torch.float32)  # noqa: E731
    short, long_ = fresh(), fresh()
    kw = dict(method=method, layers=[1, 2], batch_size=2, lr=5e-2, seed=1, progress=False)
    finetune(short, pairs, steps=3, **kw)
    seen = []
    res = finetune(long_, pairs, steps=6, keep_step=3, on_step=lambda s: seen.append((s, reply_loss(long_, pairs))),
                   **kw)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6] and len(res.losses) == 6
    assert seen[-1][1] < seen[2][1], "training went on after the kept step"
    for a, b in zip(short._model.parameters(), long_._model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    untouched = fresh()
    finetune(untouched, pairs, steps=2, keep_step=0, **kw)
    for a, b in zip(untouched._model.parameters(), fresh()._model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    with pytest.raises(ParameterError, match="keep_step"):
        finetune(fresh(), pairs, steps=2, keep_step=3, **kw)


def test_sampled_replies_are_seeded(llama):
    prompts = format_instructions(llama.tokenizer, HARMFUL, "plain")
    a = generate(llama, prompts, "plain", max_new_tokens=6, sample=True, seed=4, batch_size=2)
    assert a == generate(llama, prompts, "plain", max_new_tokens=6, sample=True, seed=4, batch_size=2)
    others = [generate(llama, prompts, "plain", max_new_tokens=6, sample=True, seed=s) for s in (5, 6)]
    assert any(o != a for o in others), "a different seed draws different replies"
