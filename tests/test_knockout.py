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
