"""The parameter checks every validation cell uses, and the data readers' one-line errors (issue 17)."""

import json
import os

import pytest
import torch

from lmbook.core.params import (LmbookError, ParameterError, check_device, check_parameter_names,
                                check_results_dir, check_seed, declared_parameters, read_jsonl, read_text)
from lmbook.data.facts import load_descriptions, load_facts
from lmbook.data.instructions import load_instructions
from lmbook.data.steering import load_text_lines, load_word_lists
from lmbook.data.tasks import load_tasks


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_seed_range():
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1
    for bad in (-1, 2**32, 10**30):
        with pytest.raises(ParameterError, match=r"SEED=.* is out of range; valid: 0\.\.4294967295"):
            check_seed(bad)
    with pytest.raises(ParameterError, match="SEED must be int, got float"):
        check_seed(float("inf"))


def test_devices():
    assert check_device("DEVICE", "auto") == "auto" and check_device("DEVICE", "cpu") == "cpu"
    for bad, match in [("cuda:x", "unknown DEVICE 'cuda:x'"), ("tpu", "unknown DEVICE 'tpu'"),
                       ("cuda:", "unknown DEVICE"), (3, "DEVICE must be a string"), ("cuda:99", "DEVICE='cuda:99'")]:
        with pytest.raises(ParameterError, match=match):
            check_device("DEVICE", bad)
    if torch.cuda.is_available():
        assert check_device("DEVICE", "cuda:0") == "cuda:0"
    else:
        with pytest.raises(ParameterError, match="no usable CUDA GPU"):
            check_device("DEVICE", "cuda")


def test_results_dir_checked_without_writing(tmp_path):
    assert check_results_dir("RESULTS_DIR", str(tmp_path)) == tmp_path
    new = tmp_path / "a" / "b"
    assert check_results_dir("RESULTS_DIR", str(new)) == new and not (tmp_path / "a").exists()
    for bad in ("", "  "):
        with pytest.raises(ParameterError, match="RESULTS_DIR is empty"):
            check_results_dir("RESULTS_DIR", bad)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ParameterError, match="is a file, not a folder"):
        check_results_dir("RESULTS_DIR", str(f))
    with pytest.raises(ParameterError, match="lies below .*file, which is a file"):
        check_results_dir("RESULTS_DIR", str(f / "sub"))
    with pytest.raises(ParameterError, match="RESULTS_DIR must be"):
        check_results_dir("RESULTS_DIR", 3)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_results_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ParameterError, match="not writable"):
        check_results_dir("RESULTS_DIR", str(ro / "results"))


def test_parameter_names():
    declared = declared_parameters("07_vector_arithmetic")
    assert declared[:2] == ["MODEL", "TASKS_PATH"] and "RESULTS_DIR" in declared
    ok = {name: None for name in declared}
    check_parameter_names({**ok, "In": [""], "PAIRS": {}, "np": None}, "07_vector_arithmetic")  # later cells' names
    with pytest.raises(ParameterError, match="unknown parameter LAYR=3; did you mean LAYER?") as e:
        check_parameter_names({**ok, "LAYR": 3}, "07_vector_arithmetic")
    one_line(e)
    # a lower-case name injected by papermill (its cell starts with "# Parameters") is a misspelling too
    with pytest.raises(ParameterError, match="unknown parameter model='x'; did you mean MODEL?"):
        check_parameter_names({**ok, "model": "x", "In": ["", "# Parameters\nmodel = 'x'\n"]}, "07_vector_arithmetic")
    # ...but the same name bound by a later cell in an interactive session is not
    check_parameter_names({**ok, "model": object(), "In": [""]}, "07_vector_arithmetic")


def test_read_text_names_the_line_of_a_bad_byte(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(ParameterError, match=r"^FACTS_PATH .*x\.jsonl, line 2: not UTF-8 text") as e:
        list(read_jsonl(f, "FACTS_PATH"))
    one_line(e)
    with pytest.raises(ParameterError, match="cannot be read"):
        read_text(tmp_path, "X")


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


def test_instructions_name_their_parameter(tmp_path):
    with pytest.raises(ParameterError, match="HARMLESS='.*missing.jsonl': no such file"):
        load_instructions(tmp_path / "missing.jsonl", "HARMLESS")
    f = tmp_path / "h.jsonl"
    f.write_bytes(b'{"id": "a", "instruction": "cr\xe8me", "category": "c", "split": "train"}\n')
    with pytest.raises(ParameterError, match="HARMFUL .*line 1: not UTF-8"):
        load_instructions(f, "HARMFUL")
    f.write_text('{"id": "a", "instruction": "x", "category": "c", "split": "train", "extra": 1}\n')
    with pytest.raises(ParameterError, match=r"HARMFUL .*line 1: unknown field\(s\) \['extra'\]"):
        load_instructions(f)
    from lmbook.experiments.refusal import load_instructions as from_refusal

    assert from_refusal is load_instructions


def test_tasks_with_bad_bytes(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "\xe9t\xe9", "output": "summer"}\n')
    with pytest.raises(ParameterError, match="TASKS_PATH .*t.jsonl, line 2: not UTF-8") as e:
        load_tasks(f)
    one_line(e)


@pytest.mark.parametrize("text,match", [
    ('{"positive": [" love"],\n "negative": [,]}', "WORD_LISTS .*line 2: not valid JSON"),
    ('[" love"]', "expected a JSON object"),
    ('{"positive": [" love"], "negative": [" hate"]}', "under 'weddings', got nothing"),
    ('{"positive": " love", "negative": [" hate"], "weddings": ["bride"]}', "under 'positive', got str"),
    ('{"positive": [" love", ""], "negative": [" hate"], "weddings": ["bride"]}', r"positive\[1\] must be a non-empty string"),
])
def test_word_lists(tmp_path, text, match):
    f = tmp_path / "w.json"
    f.write_text(text)
    with pytest.raises(ParameterError, match=match) as e:
        load_word_lists(f)
    one_line(e)


def test_word_lists_and_neutral_text_as_shipped(tmp_path):
    words = load_word_lists("data/steering/word_lists.json")
    assert all(words[k] for k in ("positive", "negative", "weddings"))
    assert len(load_text_lines("data/steering/neutral_text.txt", limit=2)) == 2
    f = tmp_path / "n.txt"
    f.write_bytes(b"ok\nna\xefve\n")
    with pytest.raises(ParameterError, match="NEUTRAL_TEXT .*line 2: not UTF-8"):
        load_text_lines(f)


def test_errors_share_one_base():
    from lmbook.core.models import ModelLoadError, ModelNotAvailableError

    assert issubclass(ParameterError, LmbookError) and issubclass(ParameterError, ValueError)
    assert issubclass(ModelLoadError, LmbookError) and issubclass(ModelNotAvailableError, ParameterError)
