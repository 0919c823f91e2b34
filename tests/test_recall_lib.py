"""Chapter 2's library: facts loading, attention knockout, attributes rate, extraction, causal tracing."""

import json

import pytest
import torch

from conftest import PROMPTS
from lmbook import ParameterError
from lmbook.experiments.recall import TokenText, attributes_rate, extraction_events, lens_topk, position_index, sublayer_knockout_topk
from lmbook.experiments.causal_tracing import causal_trace, subject_embedding_std
from lmbook.data.facts import load_descriptions, load_facts, known_mask, related_token_sets
from lmbook.mechanisms.knockout import (KINDS, _plan, group_facts, key_masks, knockout_sweep, knockout_sweep_looped,
                             last_token_run, layer_windows)
from lmbook.core.tokens import encode, token_span
from tiny import FAMILIES

SUBJECTS = ["eiffel tower", "michael jordan", "italy"]
TARGETS = torch.tensor([10, 11, 12])


# --- facts ------------------------------------------------------------------------------------


def test_project_dataset_is_valid_and_large_enough():
    facts = load_facts()
    descriptions = load_descriptions()
    assert len(facts) >= 400 and len({f.relation for f in facts}) >= 10
    assert {f.subject for f in facts} <= set(descriptions)
    assert len({f.id for f in facts}) == len(facts)


@pytest.mark.parametrize("line,message", [
    ("not json", "line 2: not valid JSON"),
    (json.dumps({"id": "x"}), "line 2: missing fields"),
    (json.dumps({"id": "b", "relation": "r", "subject": "S", "template": "{} is in", "prompt": "T is in", "attribute": "X"}),
     "line 2: prompt 'T is in' is not template.format"),
    (json.dumps({"id": "a", "relation": "r", "subject": "S", "template": "{} is in", "prompt": "S is in", "attribute": "X"}),
     "line 2: duplicate id 'a'"),
    (json.dumps({"id": "c", "relation": "r", "subject": "S", "template": "{} is in", "prompt": "S is in", "attribute": " X"}),
     "line 2: attribute ' X' has surrounding whitespace"),
])
def test_malformed_facts_name_the_line(tmp_path, line, message):
    good = json.dumps({"id": "a", "relation": "r", "subject": "S", "template": "{} is in", "prompt": "S is in", "attribute": "X"})
    path = tmp_path / "facts.jsonl"
    path.write_text(good + "\n" + line + "\n")
    before = path.read_text()
    with pytest.raises(ParameterError, match=message):
        load_facts(path)
    assert path.read_text() == before


def test_missing_facts_file(tmp_path):
    with pytest.raises(ParameterError, match="FACTS_PATH=.*no such file"):
        load_facts(str(tmp_path / "nope.jsonl"))


def test_related_tokens_exclude_subject_and_stopwords(llama):
    from lmbook.data.facts import Fact

    f = Fact("a", "r", "eiffel tower", "the {} is in", "the eiffel tower is in", "paris")
    sets = related_token_sets(llama.tokenizer, [f], {"eiffel tower": "The eiffel tower is a tower in paris and the city."})
    assert "paris" in sets["eiffel tower"] and "city" in sets["eiffel tower"]
    assert not {"the", "and", "eiffel", "tower", "is", "in"} & sets["eiffel tower"]
    with pytest.raises(ParameterError, match="no description"):
        related_token_sets(llama.tokenizer, [f], {})


def test_known_mask_counts_top1_hits(llama):
    from lmbook.data.facts import Fact
    from lmbook.mechanisms.interventions import last_token_logprobs

    facts = [Fact(str(i), "r", "italy", "the capital of {} is", "the capital of italy is", w) for i, w in enumerate(["rome", "paris"])]
    top = int(last_token_logprobs(llama, encode(llama, ["the capital of italy is"]))[0].argmax())
    word = llama.tokenizer.decode([top]).strip()
    facts.append(Fact("x", "r", "italy", "the capital of {} is", "the capital of italy is", word))
    mask = known_mask(llama, facts)
    assert mask.dtype == torch.bool and mask.tolist()[-1] is True
    assert mask.sum() == sum(f.attribute == word for f in facts)


# --- attention knockout -------------------------------------------------------------------


def test_layer_windows():
    wins = layer_windows(18, 9)
    assert len(wins) == 18
    for c, w in enumerate(wins):
        assert c in w and len(w) <= 9 and w == list(range(w[0], w[-1] + 1)) and 0 <= w[0] and w[-1] < 18
    assert wins[9] == list(range(5, 14))
    assert layer_windows(3, 1) == [[0], [1], [2]]
    with pytest.raises(ParameterError, match="WINDOW=19"):
        layer_windows(18, 19)


def test_key_masks_partition_positions():
    m = key_masks(8, (2, 4), has_bos=True)
    assert m["subject"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert m["last"].tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert m["non-subject"].tolist() == [0, 1, 0, 0, 1, 1, 1, 0]
    assert not (m["subject"] & m["non-subject"]).any()
    assert key_masks(8, (2, 4), has_bos=False)["non-subject"][0]


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


# --- attributes rate and extraction -------------------------------------------------------


def test_attributes_rate_counts_content_tokens(llama):
    tok = llama.tokenizer
    ids = torch.tensor(tok.convert_tokens_to_ids(["paris", "the", "of", "city", "italy", "a"]))
    text = TokenText(llama)
    # content tokens (not stop words, > 2 characters): paris, city, italy
    assert attributes_rate(ids, frozenset({"paris"}), text) == pytest.approx(1 / 3)
    assert attributes_rate(ids, frozenset({"paris", "italy", "rome"}), text) == pytest.approx(2 / 3)
    assert attributes_rate(torch.tensor(tok.convert_tokens_to_ids(["the", "of", "a"])), frozenset({"paris"}), text) == 0.0


def test_position_index(llama):
    b = encode(llama, PROMPTS)
    spans = torch.tensor([token_span(b, i, s) for i, s in enumerate(SUBJECTS)])
    pos = position_index(b, spans)
    assert pos[0].tolist() == [2, 3, 4, int(b.last[0])]
    assert pos[2].tolist() == [4, 4, 5, 5] or pos[2, 2] == -1


def test_sublayer_knockout_clean_column_is_the_lens(llama):
    b = encode(llama, PROMPTS)
    spans = torch.tensor([token_span(b, i, s) for i, s in enumerate(SUBJECTS)])
    ids, starts = sublayer_knockout_topk(llama, b, spans, read_layer=2, window=1, k=4)
    assert starts == [0, 1] and ids.shape == (3, 5, 4)
    lens = lens_topk(llama, b, position_index(b, spans), k=4, layers=[2])
    assert torch.equal(ids[:, 0], lens[0, :, 1])
    assert not torch.equal(ids[:, 1:], ids[:, :1].expand_as(ids[:, 1:]))


def test_extraction_events_shape_and_clean_row(llama):
    g = group_facts(llama, PROMPTS[:1], SUBJECTS[:1], TARGETS[:1])[0]
    ev = extraction_events(llama, g, g.target)
    assert ev.shape == (1, 2, llama.num_layers, 2) and ev.dtype == torch.bool
    assert torch.equal(extraction_events(llama, g, g.target, block_subject=False)[:, 0], ev[:, 0])


# --- causal tracing -------------------------------------------------------------------------


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
