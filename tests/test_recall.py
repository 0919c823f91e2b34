"""lmbook.experiments.recall (chapter 2, Geva et al. 2023): known facts, and the protocols the chapter
runs (knockout, enrichment, sublayer knockout, extraction) on a tiny model, through the same functions."""

import numpy as np
import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import encode, token_span
from lmbook.data.facts import Fact, answer_token_ids
from lmbook.experiments.recall import (
    PAPER_FINDINGS,
    EnrichmentRun,
    ExtractionRun,
    KnockoutRun,
    SublayerRun,
    TokenText,
    attributes_rate,
    dissection_curves,
    dissection_precision,
    extraction_events,
    known_by_relation,
    known_mask,
    run_enrichment,
    run_extraction,
    run_knockout,
    run_sublayer_knockout,
    sample_known,
    sublayer_knockout_topk,
)
from lmbook.mechanisms.knockout import KINDS, POSITIONS, group_facts, position_index, sweep_facts
from lmbook.mechanisms.readout import logit_lens, top1_matches

from conftest import PROMPTS

SUBJECTS = ["eiffel tower", "michael jordan", "italy"]
ATTRIBUTES = ["paris", "basketball", "rome"]
FACTS = [Fact(str(i), r, s, p.replace(s, "{}"), p, a)
         for i, (r, s, p, a) in enumerate(zip(["city", "sport", "capital"], SUBJECTS, PROMPTS, ATTRIBUTES))]
DESCRIPTIONS = {"eiffel tower": "a tower in paris france", "michael jordan": "he plays basketball music",
                "italy": "rome colosseum italy language"}


def test_known_mask_is_the_models_top1(llama):
    with torch.no_grad():
        top = [int(llama._model(**encode(llama, [f.prompt]).inputs()).logits[0, -1].argmax()) for f in FACTS]
    words = [llama.tokenizer.decode([t]).strip() for t in top]
    facts = FACTS + [Fact(f"k{i}", "r", f.subject, f.template, f.prompt, w)
                     for i, (f, w) in enumerate(zip(FACTS, words, strict=True))]
    mask = known_mask(llama, facts, batch_size=2)
    assert mask.dtype == torch.bool and mask[3:].all()
    assert mask[:3].tolist() == [a == w for a, w in zip(ATTRIBUTES, words)]
    assert torch.equal(mask, top1_matches(llama, [f.prompt for f in facts], answer_token_ids(llama, facts)))


def test_sample_known_is_seeded_sorted_and_capped():
    known = {"a": torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool), "b": torch.tensor([0, 1, 0, 0, 0], dtype=torch.bool)}
    chosen = sample_known(known, 3, seed=0)
    assert chosen == sample_known(known, 3, seed=0)
    assert len(chosen["a"]) == 3 and chosen["a"] == sorted(chosen["a"]) and set(chosen["a"]) <= {0, 2, 3, 4}
    assert chosen["b"] == [1]
    with pytest.raises(ParameterError, match="c knows none of the 5 facts"):
        sample_known({"c": torch.zeros(5, dtype=torch.bool)}, 3)


def test_known_by_relation_counts():
    table = known_by_relation(FACTS, {"m": torch.tensor([True, False, True])})
    assert list(table.index) == ["capital", "city", "sport", "all"]
    assert table.loc["all"].tolist() == [3, 2] and table.loc["sport", "m"] == 0


def test_attributes_rate_counts_content_tokens(llama):
    tok = llama.tokenizer
    ids = torch.tensor(tok.convert_tokens_to_ids(["paris", "the", "of", "city", "italy", "a"]))
    text = TokenText(llama)
    # content tokens (not stop words, > 2 characters): paris, city, italy; the rate divides by the number kept
    assert attributes_rate(ids, frozenset({"paris"}), text, keep=3) == pytest.approx(1 / 3)
    assert attributes_rate(ids, frozenset({"paris", "italy", "rome"}), text, keep=3) == pytest.approx(2 / 3)
    # as the reference: the first `keep` content tokens only, and never rescaled when fewer are found
    assert attributes_rate(ids, frozenset({"italy"}), text, keep=2) == 0.0  # italy is the third content token
    assert attributes_rate(ids, frozenset({"paris"}), text, keep=50) == pytest.approx(1 / 50)
    stop = torch.tensor(tok.convert_tokens_to_ids(["the", "of", "a"]))
    assert attributes_rate(stop, frozenset({"paris"}), text) == 0.0


def test_attributes_rates_vectorised_equals_one_list_at_a_time(llama):
    from lmbook.experiments.recall import attributes_rates

    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(llama.tokenizer), size=(2, 3, 20))
    rel = [frozenset({"paris", "city"}), frozenset({"rome", "italy", "tower"})]
    text = TokenText(llama)
    got = attributes_rates(ids, rel, text, keep=4)
    want = [[attributes_rate(ids[f, r], rel[f], text, keep=4) for r in range(3)] for f in range(2)]
    np.testing.assert_allclose(got, want)


def test_run_knockout_is_the_sweep_relative_to_clean(llama):
    run = run_knockout(llama, FACTS, window=2, progress=False)
    probs = sweep_facts(llama, PROMPTS, SUBJECTS, answer_token_ids(llama, FACTS), window=2, progress=False)
    L = llama.num_layers
    assert isinstance(run, KnockoutRun) and set(run.changes) == set(KINDS) and run.n_layers == L
    np.testing.assert_allclose(run.clean, probs[:, 0].numpy())
    np.testing.assert_allclose(run.changes["non-subject"], (probs[:, 1 + L:1 + 2 * L] / probs[:, :1] - 1).numpy() * 100)
    value, layer, depth = run.largest_drop("subject")
    assert value == pytest.approx(run.curves()["subject"].min()) and depth == layer / (L - 1)


def test_run_enrichment_reads_the_logit_lens(llama):
    short = {k: " ".join(v.split()[:2]) for k, v in DESCRIPTIONS.items()}
    run = run_enrichment(llama, FACTS, DESCRIPTIONS, top_k=5, batch_size=2, pool=20, variants={"short": short})
    assert run.variants["short"].shape == run.rates.shape and run.pool == 20
    assert isinstance(run, EnrichmentRun) and run.rates.shape == (3, llama.num_layers, len(POSITIONS))
    assert np.isnan(run.rates[2, :, 2]).all()  # "italy" has no token between it and the last one
    ok = run.rates[~np.isnan(run.rates)]
    assert ((ok >= 0) & (ok <= 1)).all()
    # fact 0, subject's last token, last layer: the rate of the logit lens's own top-5 there
    b = encode(llama, PROMPTS[:1], start=True)
    ids = logit_lens(llama, b, positions=position_index(b, torch.tensor([token_span(b, 0, SUBJECTS[0])])), k=20).top_ids
    from lmbook.experiments.recall import _other_attributes

    rel = _other_attributes(llama, FACTS, DESCRIPTIONS)[0]
    assert "paris" not in rel and "tower" not in rel  # the answer and the subject's own words are excluded
    assert run.rates[0, -1, 1] == pytest.approx(attributes_rate(ids[-1, 0, 1], rel, TokenText(llama), keep=5))
    # fewer words of the descriptions: never more related words, so never a higher rate for any list
    assert (np.nan_to_num(run.variants["short"]) <= np.nan_to_num(run.rates) + 1e-12).all()
    value, _ = run.peak("subject last")
    assert value == pytest.approx(np.nanmax(run.curve("subject last")))


def test_sublayer_knockout_clean_column_is_the_lens(llama):
    b = encode(llama, PROMPTS)
    spans = torch.tensor([token_span(b, i, s) for i, s in enumerate(SUBJECTS)])
    ids, starts = sublayer_knockout_topk(llama, b, spans, read_layer=2, window=1, k=4)
    assert starts == [0, 1] and ids.shape == (3, 5, 4)
    lens = logit_lens(llama, b, positions=position_index(b, spans), k=4, layers=[2]).top_ids
    assert torch.equal(ids[:, 0], lens[0, :, 1])
    assert not torch.equal(ids[:, 1:], ids[:, :1].expand_as(ids[:, 1:]))


def test_run_sublayer_knockout(llama):
    run = run_sublayer_knockout(llama, FACTS, DESCRIPTIONS, depth=1.0, window=1, top_k=4, batch_size=2)
    assert isinstance(run, SublayerRun) and run.read_layer == llama.num_layers - 1
    assert run.starts == list(range(run.read_layer)) and run.clean.shape == (3,)
    assert run.mlp.shape == run.attention.shape == (3, len(run.starts))
    clean, mlp, attn = run.early_effect()
    assert clean == pytest.approx(run.clean.mean()) and mlp == pytest.approx(run.mlp[:, :1].mean())
    assert attn == pytest.approx(run.attention[:, :1].mean())


def test_extraction_events_shape_and_clean_row(llama):
    g = group_facts(llama, PROMPTS[:1], SUBJECTS[:1], torch.tensor([10]))[0]
    ev = extraction_events(llama, g, g.target)
    assert ev.shape == (1, 2, llama.num_layers, 2) and ev.dtype == torch.bool
    assert torch.equal(extraction_events(llama, g, g.target, block_subject=False)[:, 0], ev[:, 0])


def test_same_layer_events_project_the_blocked_write(llama):
    from lmbook.experiments.recall import same_layer_events
    from lmbook.mechanisms.knockout import key_masks, same_layer_blocked
    from lmbook.mechanisms.readout import unembed

    g = group_facts(llama, PROMPTS, SUBJECTS, torch.tensor([10, 11, 12]))[0]
    w = same_layer_blocked(llama, g.batch, torch.stack(
        [key_masks(g.length, tuple(sp.tolist()), True)["subject"] for sp in g.spans]))
    top = unembed(llama, w["blocked"].reshape(-1, w["blocked"].shape[-1])).argmax(-1).reshape(llama.num_layers, -1)
    target = top[1]  # whatever the blocked write of layer 1 promotes: an event there by construction
    ev = same_layer_events(llama, g, target)
    assert ev.shape == (len(g.index), llama.num_layers, 3) and ev[:, 1, 2].all()
    # the clean columns agree with the propagated variant's clean row (the same updates, the same projection)
    old = extraction_events(llama, g, target, block_subject=False)[:, 0]
    assert torch.equal(ev[:, :, :2], old)


def test_run_extraction(llama):
    run = run_extraction(llama, FACTS, progress=False)
    assert isinstance(run, ExtractionRun) and run.events.shape == (3, llama.num_layers, 3)
    summary = run.any_layer(n_boot=100, seed=0)
    assert set(summary) == {"attention", "mlp", "attention_blocked"}
    for mean, lo, hi in summary.values():
        assert 0 <= lo <= mean <= hi <= 100
    both = run_extraction(llama, FACTS, progress=False, propagated=True)
    assert both.events.shape == (3, llama.num_layers, 5) and np.array_equal(both.events[..., :3], run.events)
    assert set(both.any_layer(n_boot=100)) == {"attention", "mlp", "attention_blocked",
                                               "attention_blocked_propagated", "mlp_blocked_propagated"}


# ---------------------------------------------------------------- the estimates behind the chapter's claims


def _knockout(subject_layer, nonsubject_layer, F=20, L=12, seed=0):
    """Facts whose subject (non-subject) knockout dips around the given layers, with noise."""
    rng = np.random.default_rng(seed)
    layers = np.arange(L)
    dip = lambda c: -50 * np.exp(-0.5 * ((layers - c) / 1.5) ** 2)  # noqa: E731
    changes = {"subject": dip(subject_layer) + rng.normal(0, 5, (F, L)),
               "non-subject": dip(nonsubject_layer) + rng.normal(0, 5, (F, L)), "last": rng.normal(0, 5, (F, L))}
    return KnockoutRun(changes, np.full(F, 0.5), 3)


def test_bootstrap_stat_brackets_and_needs_two_rows():
    from lmbook.core.claims import bootstrap_stat

    e = bootstrap_stat(np.arange(10.0), np.mean)
    assert e.low <= e.value == 4.5 <= e.high and e.low < e.high
    assert bootstrap_stat(np.ones(1), np.mean).missing and bootstrap_stat(np.array([np.nan, np.nan]), np.mean).missing


def _rest(F=20, L=12, mlp=0.0, attention=0.0):
    """Enrichment, sublayer and extraction runs of F facts without any effect, for :func:`paper_comparison`."""
    sub = SublayerRun(8, list(range(8)), 3, np.full(F, 10.0), np.full((F, 8), mlp), np.full((F, 8), attention))
    return EnrichmentRun(np.zeros((F, L, 4)), 50), sub, ExtractionRun(np.zeros((F, L, 3), dtype=bool))


@pytest.mark.parametrize("subject, nonsubject, outcome", [(8, 3, "as_paper"), (3, 8, "unlike_paper"),
                                                          (5, 5, "indistinguishable")])
def test_dip_layers_and_the_knockout_row(subject, nonsubject, outcome):
    from lmbook.experiments.recall import PAPER_ROWS, paper_comparison

    ko = _knockout(subject, nonsubject)
    dips = ko.dip_layers(n_boot=200)
    assert dips["subject"].value == subject and dips["non-subject"].value == nonsubject
    assert dips["subject - non-subject"].value == subject - nonsubject
    assert ko.drop_at("subject", subject).high < 0
    rows = paper_comparison(ko, *_rest(attention=9.0), None, n_boot=200)
    assert tuple(rows) == PAPER_ROWS and len(PAPER_ROWS) == len(PAPER_FINDINGS)
    assert rows["knockout"][0] == outcome
    # MLP cancelled: rate 10 -> 0; attention cancelled: 10 -> 9
    assert rows["sublayer"][0] == "as_paper" and rows["sublayer"][1]["gap"].value == pytest.approx(9.0)
    assert rows["enrichment"][0] == "indistinguishable"  # every rate zero: no gap
    assert rows["extraction"][0] == "indistinguishable" and rows["tracing"][0] == "no_data"


def test_a_curve_that_does_not_drop_has_no_dip():
    from lmbook.experiments.recall import paper_comparison

    ko = _knockout(8, 3)
    flat = KnockoutRun({k: np.abs(v) for k, v in ko.changes.items()}, ko.clean, 3)
    assert paper_comparison(flat, *_rest(), n_boot=200)["knockout"][0] == "no_dip"
    assert _rest()[1].early_drops(n_boot=200)["mlp - attention"].value == 0
    assert paper_comparison(ko, *_rest(mlp=10.0, attention=10.0), n_boot=200)["sublayer"][0] == "no_drop"
    one = KnockoutRun({k: v[:1] for k, v in ko.changes.items()}, ko.clean[:1], 3)
    assert paper_comparison(one, *_rest(F=1), n_boot=200)["knockout"][0] == "no_data"


def test_peak_gap_and_extraction_difference():
    F, L = 30, 6
    rates = np.zeros((F, L, 4))
    rates[:, 3, POSITIONS.index("subject last")] = 0.4
    rates[:, 2, POSITIONS.index("last")] = 0.1
    rates[:, :, POSITIONS.index("after subject")] = np.nan  # no fact has a token after its subject
    e = EnrichmentRun(rates, 50)
    assert e.peak_gap("subject last", "last", n_boot=100).value == pytest.approx(30.0)
    assert e.peak_gap("subject last", "after subject", n_boot=100).missing
    events = np.zeros((F, L, 3), dtype=bool)
    events[:20, 4, 0] = True  # attention events in 20 facts, none when the subject is blocked
    events[:5, 1, 1] = True  # MLP events in 5
    x = ExtractionRun(events)
    assert x.hits("attention").sum() == 20 and x.hits("attention_blocked").sum() == 0
    d = x.difference("attention", "mlp", n_boot=200)
    assert d.value == pytest.approx(0.5) and d.low > 0
    assert x.difference("attention_blocked", "attention", n_boot=200).high < 0


def test_run_knockout_window_defaults_to_the_papers_relative_depth(llama):
    from lmbook.experiments.recall import knockout_window
    from lmbook.mechanisms.knockout import relative_window

    assert knockout_window(llama) == relative_window(llama.num_layers) and knockout_window(llama, 2) == 2
    run = run_knockout(llama, FACTS, progress=False)
    assert run.window == relative_window(llama.num_layers) and run.start
    with pytest.raises(ParameterError, match="WINDOW=9"):
        knockout_window(llama, 9)  # deeper than the tiny model's 3 layers


def test_sink_share_is_the_part_of_the_bare_drop_the_start_token_removes():
    from lmbook.experiments.recall import sink_share

    ko = _knockout(8, 3)
    bare = KnockoutRun({k: 2 * v for k, v in ko.changes.items()}, ko.clean, 3, start=False)
    s = sink_share(ko, bare, n_boot=200)
    assert s["bare"].value == pytest.approx(2 * s["fixed"].value)
    assert s["share"].value == pytest.approx(0.5) and s["share"].low <= 0.5 <= s["share"].high
    assert sink_share(ko, ko, n_boot=200)["share"].value == pytest.approx(0.0)
    with pytest.raises(ParameterError, match="unknown knockout kind"):
        sink_share(ko, bare, kind="relation")


def test_paper_items_lists_every_item_with_ours_computed():
    from lmbook.experiments.recall import PAPER_ITEMS, paper_items, sink_share

    ko = _knockout(8, 3)
    enrich, _, extract = _rest()
    bare = KnockoutRun({k: 2 * v for k, v in ko.changes.items()}, ko.clean, 3, start=False)
    table = paper_items("m", ko, enrich, extract, FACTS, 2, sink=sink_share(ko, bare, n_boot=100), sink_model="s",
                        n_boot=100)
    assert list(table["item"]) == [item for item, _ in PAPER_ITEMS.values()]
    ours = dict(zip(PAPER_ITEMS, table["this run"]))
    assert ours["tracing"] == "not run (N_TRACE)" and "0.50" in ours["start"]
    assert ours["generality"].startswith("3 facts, 3 relations") and "knows 2" in ours["generality"]


def test_dissection_precision_compares_the_first_facts_curves(llama):
    """Chapter 2's measure of what its bfloat16 copy changes: the float32 run of the first facts
    against the copy's run of all facts, curve by curve; zero against itself, the copy's change
    against a copy (small but not zero), and the first facts only."""
    from lmbook.core.models import load_copy

    fast_model = load_copy(llama, "bfloat16", attention_probs=True)

    def runs(m, facts):
        return {"knockout": run_knockout(m, facts, window=2, progress=False),
                "enrichment": run_enrichment(m, facts, DESCRIPTIONS, top_k=5, pool=20),
                "sublayer": run_sublayer_knockout(m, facts, DESCRIPTIONS, window=1, top_k=5, pool=20),
                "extraction": run_extraction(m, facts, progress=False)}

    exact_all = runs(llama, FACTS)
    same = dissection_precision(exact_all, exact_all)
    assert all(v["max_difference"] == 0.0 and v["n_facts"] == 3 for v in same.values())
    exact_two = runs(llama, FACTS[:2])
    fast = runs(fast_model, FACTS)
    d = dissection_precision(fast, exact_two)
    assert all(v["n_facts"] == 2 for v in d.values())
    assert 0.0 < d["knockout"]["max_difference"] < 0.2 * d["knockout"]["max_value"]
    # the curves compared are the first two facts' means, not all three facts'
    first_two = dissection_curves("knockout", fast["knockout"], 2)
    np.testing.assert_allclose(np.nanmax(np.abs(first_two - dissection_curves("knockout", exact_two["knockout"]))),
                               d["knockout"]["max_difference"])
    with pytest.raises(ParameterError, match="unknown measure"):
        dissection_curves("lens", exact_all["knockout"])
