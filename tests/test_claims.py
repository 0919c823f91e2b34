"""Claims (lmbook.core.claims): outcomes on both sides of each condition and inside the uncertainty band,
the glued sentence is the one the outcome selects, and bad input fails with a one-line message."""

import json

import pytest

from lmbook.core.claims import (
    PRECISION,
    ClaimError,
    Estimate,
    against_paper,
    compare,
    order,
    overlap,
    precision_outcome,
    record_claim,
    spans,
    within,
)
from lmbook.core.records import Recorder

NAN = float("nan")
SENTENCES = {
    "greater": "A ({a:.2f}) exceeds B ({b:.2f}).",
    "less": "A ({a:.2f}) falls short of B ({b:.2f}).",
    "indistinguishable": "A and B cannot be told apart at this sample size.",
    "no_data": "This run has no data to compare A and B.",
}


@pytest.mark.parametrize("a, b, outcome", [
    (Estimate(0.8, 0.7, 0.9), Estimate(0.3, 0.2, 0.4), "greater"),
    (Estimate(0.3, 0.2, 0.4), Estimate(0.8, 0.7, 0.9), "less"),
    (Estimate(0.6, 0.4, 0.8), Estimate(0.5, 0.3, 0.7), "indistinguishable"),  # intervals overlap
    (Estimate(0.6, 0.5, 0.7), Estimate(0.45, 0.3, 0.5), "indistinguishable"),  # they touch: no separation
    (Estimate(0.6, 0.55, 0.7), 0.5, "greater"),  # a plain number is exact
    (Estimate.exact(2), Estimate.exact(2), "indistinguishable"),
    (Estimate(NAN, NAN, NAN), Estimate(0.3, 0.2, 0.4), "no_data"),
])
def test_compare(a, b, outcome):
    assert compare(a, b) == outcome


@pytest.mark.parametrize("a, outcome", [
    (Estimate(0.7, 0.6, 0.8), "inside"), (Estimate(0.2, 0.1, 0.3), "outside"), (0.95, "outside"),
    (Estimate(0.5, 0.4, 0.6), "indistinguishable"), (Estimate(NAN, NAN, NAN), "no_data"),
])
def test_within(a, outcome):
    assert within(a, 0.5, 0.9) == outcome


@pytest.mark.parametrize("first, second, outcome", [
    ([0, 1, 2], [3, 4], "before"), ([5, 6], [1, 2], "after"), ([0, 3], [2, 5], "overlap"),
    ([], [3], "first_empty"), ([1], [], "second_empty"), ([], [], "no_data"),
])
def test_order(first, second, outcome):
    assert order(first, second) == outcome


@pytest.mark.parametrize("a, b, n, outcome", [
    ([1, 2, 3, 4, 5], [1, 2, 3, 9, 10], 72, "beyond_chance"),  # 3 of 5 shared among 72: far above 5 * 5 / 72
    ([1, 2, 3, 4, 5], [1, 6, 7, 8, 9], 72, "chance"),  # one shared: P(>= 1) is about 0.31
    ([1, 2, 3, 4, 5], [1, 2, 7, 8, 9], 72, "beyond_chance"),  # two shared: P(>= 2) is about 0.03
    ([1, 2, 3, 4, 5], [1, 2, 7, 8, 9], 10, "chance"),  # among 10 items, two of five shared is expected
    ([1, 2], [3, 4], 72, "none"), ([], [1], 72, "no_data"),
])
def test_overlap(a, b, n, outcome):
    assert overlap(a, b, n) == outcome


@pytest.mark.parametrize("layers, text", [([0, 1, 2, 5, 7, 8], "0–2, 5, 7–8"), ([3], "3"), ([], "none")])
def test_spans(layers, text):
    assert spans(layers) == text


@pytest.mark.parametrize("ours, outcome", [
    ("greater", "as_paper"), ("less", "unlike_paper"), ("indistinguishable", "indistinguishable"),
    ("no_data", "no_data"),
])
def test_against_paper(ours, outcome):
    assert against_paper(ours, "greater") == outcome


def test_estimates():
    e = Estimate.rate(3, 10)
    assert e.low < 0.3 < e.high and format(e, ".2f").startswith("0.30 [")
    assert Estimate.rate(0, 0).missing and format(Estimate.rate(0, 0), ".2f") == "nan"
    b = Estimate.bootstrap([1.0, 2.0, 3.0, NAN])
    assert b.value == 2.0 and b.low <= 2.0 <= b.high
    assert Estimate.bootstrap([]).missing
    assert format(Estimate.exact(3), "d") == "3"
    s = Estimate.share([True, False, False, True])
    assert s.value == 0.5 and s.low < 0.5 < s.high and Estimate.share([]).missing
    assert Estimate.from_share(0.25, 8) == Estimate.rate(2, 8)
    assert Estimate.from_share(None, 8).missing and Estimate.from_share(0.5, 0).missing


@pytest.mark.parametrize("a, b, outcome", [
    (Estimate(0.8, 0.7, 0.9), Estimate(0.3, 0.2, 0.4), "greater"),
    (Estimate(0.3, 0.2, 0.4), Estimate(0.8, 0.7, 0.9), "less"),
    (Estimate(0.6, 0.4, 0.8), Estimate(0.5, 0.3, 0.7), "indistinguishable"),
    (Estimate(NAN, NAN, NAN), Estimate(0.5, 0.3, 0.7), "no_data"),
])
def test_recorded_and_glued_sentence_is_the_one_the_outcome_selects(tmp_path, glued, a, b, outcome):
    rec = Recorder("ch", tmp_path)
    sentence = record_claim(rec, "claim_ab", compare(a, b), SENTENCES, a=a, b=b)
    assert glued["claim_ab"] == sentence == SENTENCES[outcome].format(a=a, b=b)
    saved = json.loads((tmp_path / "ch.json").read_text())["claims"]["claim_ab"]
    assert saved["outcome"] == outcome and saved["sentence"] == sentence == saved["sentences"][outcome]
    assert set(saved["sentences"]) == set(SENTENCES)
    if outcome == "greater":
        assert sentence == "A (0.80 [0.70, 0.90]) exceeds B (0.30 [0.20, 0.40])."


def test_several_claims_are_kept(tmp_path, glued):
    rec = Recorder("ch", tmp_path)
    record_claim(rec, "c1", "yes", {"yes": "one", "no": "two"})
    record_claim(rec, "c2", "no", {"yes": "one", "no": "two"})
    saved = json.loads((tmp_path / "ch.json").read_text())
    assert {k: v["sentence"] for k, v in saved["claims"].items()} == {"c1": "one", "c2": "two"}
    assert glued == {"c1": "one", "c2": "two"}


@pytest.mark.parametrize("make, message", [
    (lambda: Estimate(0.9, 0.1, 0.5), "does not contain its estimate"),
    (lambda: Estimate(0.3, NAN, 0.5), "all three numbers or none"),
    (lambda: compare("0.5", 0.3), "expected an Estimate or a number"),
    (lambda: within(0.5, 0.9, 0.1), "is empty"),
    (lambda: Estimate.from_share(1.5, 4), "is not between 0 and 1"),
    (lambda: against_paper("greater", "indistinguishable"), "definite outcome"),
    (lambda: overlap([1, 2, 3], [3, 4], 3), "at least the 4 the two sets hold"),
])
def test_bad_input_fails_with_one_line(make, message):
    with pytest.raises(ClaimError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("outcome, sentences, values, message", [
    ("maybe", SENTENCES, {"a": 1.0, "b": 2.0}, "outcome 'maybe' has no sentence"),
    ("greater", SENTENCES, {"a": 1.0}, "uses {b}, which is not among its values"),
    ("greater", {"greater": "A is {a:d}"}, {"a": 0.5}, "cannot format the sentence for 'greater'"),
    ("greater", {"greater": ""}, {}, "is not a non-empty string"),
])
def test_bad_claims_fail_with_one_line_and_record_nothing(tmp_path, glued, outcome, sentences, values, message):
    rec = Recorder("ch", tmp_path)
    with pytest.raises(ClaimError) as e:
        record_claim(rec, "claim_x", outcome, sentences, **values)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ch.json").exists() and not glued


def test_bad_claim_name(tmp_path, glued):
    with pytest.raises(ClaimError, match="must be an identifier"):
        record_claim(Recorder("ch", tmp_path), "claim x", "a", {"a": "s"})


@pytest.mark.parametrize("copied, comparison, outcome", [
    (False, {"d": 0.0}, "exact"),  # no copy: nothing to compare, whatever was passed
    (True, None, "unchecked"),
    (True, {}, "unchecked"),
    (True, {"d": 0.01}, "small"),
    (True, {"d": 0.5}, "large"),
])
def test_precision_outcome(copied, comparison, outcome):
    assert precision_outcome(copied, comparison, lambda c: c["d"] <= 0.1) == outcome
    assert outcome in PRECISION
