"""lmbook.mechanisms.knockout (chapter 2): attention knockout from the last position, batched and looped."""

import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode, token_span
from lmbook.mechanisms.knockout import (
    KINDS,
    POSITIONS,
    _plan,
    group_facts,
    key_masks,
    knockout_sweep,
    knockout_sweep_looped,
    last_token_run,
    layer_windows,
    position_index,
    relative_window,
    same_layer_blocked,
    sweep_facts,
)

from conftest import PROMPTS
from tiny import FAMILIES

SUBJECTS = ["eiffel tower", "michael jordan", "italy"]
TARGETS = torch.tensor([10, 11, 12])


def test_layer_windows():
    wins = layer_windows(18, 9)
    assert len(wins) == 18
    for c, w in enumerate(wins):
        assert c in w and len(w) <= 9 and w == list(range(w[0], w[-1] + 1)) and 0 <= w[0] and w[-1] < 18
    assert wins[9] == list(range(5, 14))
    assert layer_windows(3, 1) == [[0], [1], [2]]
    with pytest.raises(ParameterError, match="size=19"):
        layer_windows(18, 19)
    with pytest.raises(ParameterError, match="window=19"):  # the caller's own argument is named
        layer_windows(18, 19, "window")


def test_key_masks_partition_positions():
    m = key_masks(8, (2, 4), has_bos=True)
    assert m["subject"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert m["last"].tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert m["non-subject"].tolist() == [0, 1, 0, 0, 1, 1, 1, 0]
    assert not (m["subject"] & m["non-subject"]).any()
    assert key_masks(8, (2, 4), has_bos=False)["non-subject"][0]


def test_plan_never_blocks_the_start_token(llama):
    """The tiny tokenizer adds a BOS: no row of the sweep may stop the last token reading it."""
    g = group_facts(llama, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]
    assert int(g.batch.input_ids[0, 0]) == llama.tokenizer.bos_token_id
    keep, active = _plan(llama, g, KINDS, layer_windows(llama.num_layers, 1))
    assert keep[:, :, 0].eq(1).all()
    assert keep.shape == (1, 1 + len(KINDS) * llama.num_layers, g.length) and not active[:, 0].any()


def test_position_index(llama):
    b = encode(llama, PROMPTS)
    spans = torch.tensor([token_span(b, i, s) for i, s in enumerate(SUBJECTS)])
    pos = position_index(b, spans)
    assert pos.shape == (3, len(POSITIONS))
    assert pos[0].tolist() == [2, 3, 4, int(b.last[0])]  # <bos> the eiffel tower is ...
    assert pos[2].tolist() == [4, 4, -1, 5]  # "italy" is followed by the last token "is"


# transformers rebuilds the tiny Qwen2 checkpoint's word-level tokenizer as a Qwen2 BPE tokenizer, which
# maps these prompts to unknown tokens without character offsets, so subject spans cannot be found there.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2"])
def test_batched_knockout_sweep_equals_looped(family, tiny_models):
    model = tiny_models[family]
    groups = group_facts(model, PROMPTS, SUBJECTS, TARGETS)
    assert sorted(i for g in groups for i in g.index) == [0, 1, 2]
    for g in groups:
        batched = knockout_sweep(model, g, window=2)
        looped = knockout_sweep_looped(model, g, window=2)
        assert batched.shape == (len(g.index), 1 + len(KINDS) * model.num_layers)
        torch.testing.assert_close(batched, looped, atol=1e-4, rtol=0)


def test_sweep_facts_puts_rows_back_in_order(llama):
    out = sweep_facts(llama, PROMPTS, SUBJECTS, TARGETS, window=2, max_group=1, progress=False)
    for g in group_facts(llama, PROMPTS, SUBJECTS, TARGETS):
        torch.testing.assert_close(out[g.index], knockout_sweep(llama, g, window=2), atol=1e-6, rtol=0)


def test_knockout_of_no_positions_changes_nothing(llama):
    g = group_facts(llama, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]
    n = g.length
    plain, _ = last_token_run(llama, g, None, None, 2)
    keep = torch.ones(2, n)  # nothing blocked ...
    active = torch.ones(llama.num_layers, 2, dtype=torch.bool)  # ... at every layer
    edited, _ = last_token_run(llama, g, keep, active, 2)
    torch.testing.assert_close(edited, plain, atol=1e-6, rtol=0)
    with torch.no_grad():
        full = llama._model(**g.batch.inputs()).logits[0, -1].softmax(-1)
    torch.testing.assert_close(plain[0], full, atol=1e-5, rtol=0)  # the cached prefix is exact


def test_knockout_changes_the_output(llama):
    g = group_facts(llama, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]
    p = knockout_sweep(llama, g, window=3)
    assert not torch.allclose(p[:, 1:], p[:, :1].expand_as(p[:, 1:]))


def test_unknown_knockout_kind(llama):
    g = group_facts(llama, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]
    with pytest.raises(ParameterError, match="unknown knockout kinds"):
        _plan(llama, g, ["relation"], layer_windows(3, 1))


def _hand_blocked(model, batch, block, layer):
    """The blocked attention write at ``layer`` computed by hand with plain PyTorch hooks on the
    Hugging Face modules: the clean attention probabilities and value vectors of the last token,
    the blocked weights zeroed, each head's mix recomputed, then the output projection and the
    family's post-attention norm."""
    hf = model._model
    blocks = hf.model.layers if hasattr(hf, "model") else hf.transformer.h
    lay = blocks[layer]
    attn = getattr(lay, "self_attn", None) or lay.attn
    grab = {}
    vmod = getattr(attn, "v_proj", None) or attn.c_attn
    omod = next(getattr(attn, n) for n in ("o_proj", "out_proj", "c_proj") if hasattr(attn, n))
    h1 = vmod.register_forward_hook(lambda m, i, o: grab.__setitem__("v", o.detach()))
    h2 = omod.register_forward_hook(lambda m, i, o: grab.__setitem__("z", i[0].detach()))
    try:
        with torch.no_grad():
            out = hf(**batch.inputs(), output_attentions=True)
    finally:
        h1.remove()
        h2.remove()
    p = out.attentions[layer][:, :, -1]  # [B, H, n]
    v = grab["v"] if hasattr(attn, "v_proj") else grab["v"].chunk(3, dim=-1)[2]
    B, n, _ = v.shape
    H = p.shape[1]
    hd = grab["z"].shape[-1] // H
    v = v.view(B, n, -1, hd)
    v = v.repeat_interleave(H // v.shape[2], dim=2)  # [B, n, H, hd]
    z_clean = torch.einsum("bhj,bjhk->bhk", p, v).reshape(B, -1)
    torch.testing.assert_close(z_clean, grab["z"][:, -1], atol=1e-5, rtol=1e-4)  # the hand mix is the model's
    q = p * (~block)[:, None, :]
    with torch.no_grad():
        w = omod(torch.einsum("bhj,bjhk->bhk", q, v).reshape(B, 1, -1))[:, 0]
        if getattr(lay, "post_feedforward_layernorm", None) is not None:
            w = lay.post_attention_layernorm(w)
    return w


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2"])
def test_same_layer_blocked_equals_a_hand_computation(family, tiny_models):
    model = tiny_models[family]
    g = group_facts(model, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]
    block = key_masks(g.length, tuple(g.spans[0].tolist()), True)["subject"][None]
    got = same_layer_blocked(model, g.batch, block)
    L = model.num_layers
    assert all(t.shape == (L, 1, got["attention"].shape[-1]) for t in got.values())
    for layer in range(L):
        torch.testing.assert_close(got["blocked"][layer], _hand_blocked(model, g.batch, block, layer).float(),
                                   atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got["blocked"], got["attention"])  # the subject's share was removed
    nothing = same_layer_blocked(model, g.batch, torch.zeros_like(block))
    torch.testing.assert_close(nothing["blocked"], nothing["attention"], atol=1e-5, rtol=1e-4)


def test_same_layer_blocked_never_blocks_the_start_token(llama):
    g = group_facts(llama, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]
    first = torch.zeros(1, g.length, dtype=torch.bool)
    first[0, 0] = True  # asks to block the <bos> sink: refused, so nothing changes
    out = same_layer_blocked(llama, g.batch, first)
    torch.testing.assert_close(out["blocked"], out["attention"], atol=1e-5, rtol=1e-4)


def test_relative_window_matches_the_paper_and_stays_odd():
    assert relative_window(48) == 9  # GPT-2 XL: the paper's window
    assert relative_window(18) == 3 and relative_window(30) == 5 and relative_window(28) == 5
    assert all(relative_window(n) % 2 == 1 and relative_window(n) >= 3 for n in range(3, 100))
    assert relative_window(2) == 2  # never wider than the model
    with pytest.raises(ParameterError, match="WINDOW_FRACTION=0"):
        relative_window(18, 0)


def test_key_masks_never_block_the_start_token_even_under_the_subject():
    m = key_masks(6, (0, 2), has_bos=True)
    assert not any(mask[0] for mask in m.values())
    m = key_masks(6, (0, 2), has_bos=False)  # no start token: position 0 is a word of the prompt
    assert m["subject"][0] and not m["non-subject"][0]


@pytest.fixture(scope="module")
def no_bos_llama(tmp_path_factory):
    """The tiny Llama with a tokenizer that adds no BOS (as SmolLM2's)."""
    from lmbook.core.models import load_model

    import tiny

    folder = tiny.build("llama", tmp_path_factory.mktemp("nobos") / "llama")
    tok = tiny.make_tokenizer()
    tok.backend_tokenizer.post_processor = None
    tok.save_pretrained(folder)
    return load_model(str(folder), device="cpu", dtype=torch.float32)


def test_the_start_token_is_put_first_and_never_blocked(no_bos_llama):
    from lmbook.core.tokens import start_token_id

    model = no_bos_llama
    sid = start_token_id(model)
    assert sid is not None
    g = group_facts(model, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]  # start=True by default
    assert int(g.batch.input_ids[0, 0]) == sid and int(g.batch.input_ids[0, 1]) != sid
    keep, _ = _plan(model, g, KINDS, layer_windows(model.num_layers, 1))
    assert keep[:, :, 0].eq(1).all()  # the sink is read in every row
    bare = group_facts(model, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1], start=False)[0]
    assert bare.length == g.length - 1 and int(bare.batch.input_ids[0, 0]) != sid
    keep, _ = _plan(model, bare, KINDS, layer_windows(model.num_layers, 1))
    assert keep[0, 1 + model.num_layers, 0] == 0  # without it, "non-subject" blocks the first word
    p = sweep_facts(model, PROMPTS, SUBJECTS, TARGETS, window=1, progress=False)
    q = sweep_facts(model, PROMPTS, SUBJECTS, TARGETS, window=1, progress=False, start=False)
    assert p.shape == q.shape and not torch.allclose(p, q)


def test_knockouts_run_on_a_bfloat16_copy_with_attention_probabilities(llama):
    """``load_copy(..., attention_probs=True)`` (chapter 2's knockouts and lens run on such a copy): the
    copy reads and edits attention probabilities, its knockout sweep is close to the float32 model's,
    and a knockout still changes its output."""
    from lmbook.core.models import load_copy, model_dtype

    fast = load_copy(llama, "bfloat16", attention_probs=True)
    assert model_dtype(fast) == torch.bfloat16
    exact = sweep_facts(llama, PROMPTS, SUBJECTS, TARGETS, window=2, progress=False)
    cheap = sweep_facts(fast, PROMPTS, SUBJECTS, TARGETS, window=2, progress=False)
    assert cheap.shape == exact.shape and cheap.dtype == exact.dtype
    assert (cheap - exact).abs().max() < 0.05 and not torch.equal(cheap, exact)
    g = group_facts(fast, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]
    p = knockout_sweep(fast, g, window=3)
    assert not torch.allclose(p[:, 1:], p[:, :1].expand_as(p[:, 1:]))
