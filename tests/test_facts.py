"""lmbook.data.facts (chapter 2's dataset): loading with schema checks, answer tokens, related words."""

import json

import pytest

from lmbook import ParameterError
from lmbook.data.facts import Fact, answer_token_ids, load_descriptions, load_facts, related_token_sets, word_pieces

from conftest import one_line


def test_project_dataset_is_valid_and_large_enough():
    facts = load_facts()
    descriptions = load_descriptions()
    assert len(facts) >= 400 and len({f.relation for f in facts}) >= 10
    assert {f.subject for f in facts} <= set(descriptions)
    assert len({f.id for f in facts}) == len(facts)


def _fact(**kw):
    return json.dumps({"id": "a", "relation": "r", "subject": "S", "template": "{} is in", "prompt": "S is in",
                       "attribute": "X", **kw})


@pytest.mark.parametrize("line,message", [
    ("not json", "line 2: not valid JSON"),
    (json.dumps({"id": "x"}), "line 2: missing fields"),
    (_fact(id="b", prompt="T is in"),
     "line 2: prompt 'T is in' is not template.format"),
    (_fact(),
     "line 2: duplicate id 'a'"),
    (_fact(id="c", attribute=" X"),
     "line 2: attribute ' X' has surrounding whitespace"),
])
def test_malformed_facts_name_the_line(tmp_path, line, message):
    good = _fact()
    path = tmp_path / "facts.jsonl"
    path.write_text(good + "\n" + line + "\n")
    before = path.read_text()
    with pytest.raises(ParameterError, match=message):
        load_facts(path)
    assert path.read_text() == before


def test_missing_facts_file(tmp_path):
    with pytest.raises(ParameterError, match="FACTS_PATH=.*no such file"):
        load_facts(str(tmp_path / "nope.jsonl"))


def test_answer_token_ids_are_the_first_token_after_a_space(llama):
    facts = [Fact("a", "r", "italy", "the capital of {} is", "the capital of italy is", w) for w in ["rome", "paris"]]
    ids = answer_token_ids(llama.tokenizer, facts)
    tok = llama.tokenizer
    assert ids.tolist() == [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ["rome", "paris"]]
    assert answer_token_ids(llama, facts).tolist() == ids.tolist()  # a model or its tokenizer


def test_related_tokens_exclude_subject_and_stopwords(llama):
    f = Fact("a", "r", "eiffel tower", "the {} is in", "the eiffel tower is in", "paris")
    description = {"eiffel tower": "The eiffel tower is a tower in paris and the city."}
    sets = related_token_sets(llama.tokenizer, [f], description)
    assert "paris" in sets["eiffel tower"] and "city" in sets["eiffel tower"]
    assert not {"the", "and", "eiffel", "tower", "is", "in"} & sets["eiffel tower"]
    assert word_pieces(llama.tokenizer, "Paris") >= {"paris"}
    with pytest.raises(ParameterError, match="no description"):
        related_token_sets(llama.tokenizer, [f], {})


def test_facts_module_runs_no_model():
    """The data layer reads files and tokenizers only: it imports no mechanism or experiment."""
    import ast
    from pathlib import Path

    from lmbook.data import facts

    tree = ast.parse(Path(facts.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.startswith(("lmbook.mechanisms", "lmbook.experiments"))}


FACT = {"id": "f1", "relation": "capital", "subject": "France", "template": "The capital of {} is",
        "prompt": "The capital of France is", "attribute": "Paris"}



@pytest.mark.parametrize("template,prompt", [("{} in {region}", "France in"), ("{0} is {}", "France is"),
                                             ("{} {", "France {"), ("no placeholder", "no placeholder")])
def test_fact_templates_with_other_braces(tmp_path, template, prompt):
    f = tmp_path / "facts.jsonl"
    f.write_text(json.dumps({**FACT, "template": template, "prompt": prompt}) + "\n")
    with pytest.raises(ParameterError, match=r"FACTS_PATH .*line 1: template .* exactly one placeholder") as e:
        load_facts(f)
    one_line(e)


def test_facts_and_descriptions_with_bad_bytes(tmp_path):
    f = tmp_path / "facts.jsonl"
    f.write_bytes(json.dumps(FACT).encode() + b"\n" + json.dumps(FACT).replace("France", "Fr\\u00e0nce").encode()
                  .replace(b"\\u00e0", b"\xe0") + b"\n")
    with pytest.raises(ParameterError, match="FACTS_PATH .*line 2: not UTF-8"):
        load_facts(f)
    d = tmp_path / "subjects.jsonl"
    d.write_bytes(b'{"subject": "Z\xfcrich", "description": "A city."}\n')
    with pytest.raises(ParameterError, match="DESCRIPTIONS_PATH .*line 1: not UTF-8"):
        load_descriptions(d)
    d.write_text("\n")
    with pytest.raises(ParameterError, match="holds no descriptions"):
        load_descriptions(d)


def test_first_words_cuts_each_description():
    from lmbook.data.facts import first_words

    d = {"a": "one two  three\nfour", "b": "x"}
    assert first_words(d, 2) == {"a": "one two", "b": "x"}
    assert first_words(d, 10) == {"a": "one two three four", "b": "x"}
    with pytest.raises(ParameterError):
        first_words(d, 0)


def test_the_long_descriptions_describe_known_subjects_at_length():
    from lmbook.data.facts import load_descriptions, load_facts

    subjects = {f.subject for f in load_facts()}
    long = load_descriptions("data/facts/subjects_long.jsonl", "LONG_DESCRIPTIONS_PATH")
    assert set(long) <= subjects and len(long) >= 100
    assert all(100 <= len(d.split()) <= 160 for d in long.values())
