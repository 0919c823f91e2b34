"""Generation with and without interventions (lmbook.mechanisms.generation) on tiny random models."""


import pytest
import torch

from lmbook.core.tokens import encode
from lmbook.mechanisms.generation import NucleusDraw, TopP, generate_ids, greedy_tokens
from lmbook.mechanisms.interventions import hidden_states
from lmbook.mechanisms.readout import next_token

from conftest import PROMPTS


def test_greedy_generate_matches_hf_generate_and_own_patch(llama):
    b = encode(llama, PROMPTS)
    def greedy_generate(m, batch, n, **kw):
        return [m.tokenizer.decode(r) for r in greedy_tokens(m, batch, n, **kw)]

    got = greedy_generate(llama, b, 3)
    for i, p in enumerate(PROMPTS):
        one = encode(llama, p)
        with torch.no_grad():
            out = llama._model.generate(**one.inputs(), max_new_tokens=3, do_sample=False, pad_token_id=1)
        assert got[i] == llama.tokenizer.decode(out[0, one.input_ids.shape[1]:])
    own = hidden_states(llama, b, [1])[0]
    assert greedy_generate(llama, b, 3, layer=1, vectors=own) == got
    moved = greedy_generate(llama, b, 3, layer=1, vectors=own[[1, 2, 0]])
    assert moved != got


def test_greedy_patches_only_the_given_rows(llama):
    b = encode(llama, PROMPTS)
    plain = greedy_tokens(llama, b, 2)
    own = hidden_states(llama, b, [0])[0]
    other = own[[2, 0, 1]]
    moved = greedy_tokens(llama, b, 2, layer=0, vectors=other[1:2], patch_rows=[1])
    everywhere = greedy_tokens(llama, b, 2, layer=0, vectors=other)
    assert moved[0] == plain[0] and moved[2] == plain[2]
    assert moved[1] == everywhere[1]
    assert [r[0] for r in plain] == next_token(llama, b).top1[0].tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_greedy_equals_one_full_forward_per_token(family, tiny_models):
    """The cached generation equals greedy decoding by hand, one uncached forward per new token, also
    with a vector patched at the prompt's last token (which the cache then carries)."""
    model = tiny_models[family]
    b = encode(model, PROMPTS)
    v = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    for kw in ({}, {"layer": 1, "vectors": v}):
        got = greedy_tokens(model, b, 3, **kw)
        for i in range(len(PROMPTS)):
            ids = b.input_ids[i, : int(b.last[i]) + 1].tolist()
            p = len(ids) - 1
            for _ in range(3):
                t = torch.tensor([ids])
                with torch.no_grad(), model.trace({"input_ids": t, "attention_mask": torch.ones_like(t)}):
                    if kw:
                        model.layers_output[1][0, p] = v
                    nxt = model.logits[0, -1].argmax().save()
                ids.append(int(nxt))
            assert got[i] == ids[-3:], (family, kw.keys())


def test_fast_top_p_matches_transformers():
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    for scale, p in [(1.0, 0.3), (3.0, 0.3), (0.1, 0.9), (5.0, 0.95)]:
        scores = torch.randn(6, 5000) * scale
        ours = TopP(p, k=64)(None, scores.clone())
        ref = TopPLogitsWarper(p)(None, scores.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (scale, p)
        assert torch.equal(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])
        ours = TopP(p, temperature=0.7, k=64)(None, scores.clone())
        ref = TopPLogitsWarper(p)(None, TemperatureLogitsWarper(0.7)(None, scores.clone()))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (scale, p)
        assert torch.equal(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


@pytest.mark.parametrize("scale,p,temperature", [(1.0, 0.3, 1.0), (3.0, 0.9, 0.7), (0.05, 0.5, 1.0), (1.0, 1.0, 1.0)])
def test_nucleus_draw_draws_from_the_filtered_softmax(scale, p, temperature):
    """``NucleusDraw`` (what sampled generation uses): one token per row, returned as 0 among -inf,
    drawn with the probabilities transformers' sampler would use (softmax of the TopP-filtered
    scores), whether the nucleus lies within its top ``k`` (scale 1 and 3) or not (0.05: nearly flat
    scores, the full-vocabulary path), and with no filter at ``top_p=1``."""
    torch.manual_seed(0)
    row = torch.randn(1, 300) * scale
    want = TopP(p, temperature=temperature)(None, row.clone()).softmax(-1)[0]
    n = 40_000
    out = NucleusDraw(p, temperature=temperature, k=32)(None, row.expand(n, -1).clone())
    assert out.shape == (n, 300) and bool(((out == 0).sum(-1) == 1).all())
    assert bool(torch.isinf(out[out != 0]).all())
    freq = torch.bincount(out.argmax(-1), minlength=300).float() / n
    assert float(freq[want == 0].sum()) == 0.0  # never a token the filter removes
    # each token's share within a few binomial standard deviations of its probability
    sd = (want * (1 - want) / n).sqrt()
    assert bool(((freq - want).abs() <= 5 * sd + 1e-4).all())


def test_sampled_generation_is_seeded_and_differs_across_seeds(llama):
    from lmbook.core.tokens import left_padded

    batch = left_padded(llama, encode(llama, PROMPTS))
    a = generate_ids(llama, batch, 6, sample=True, top_p=0.9, seed=3)
    assert torch.equal(a, generate_ids(llama, batch, 6, sample=True, top_p=0.9, seed=3))
    assert not torch.equal(a, generate_ids(llama, batch, 6, sample=True, top_p=0.9, seed=4))
