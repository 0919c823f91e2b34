"""The parameter checks every validation cell uses, and the data readers' one-line errors (issue 17)."""

import os

import pytest
import torch

from lmbook.core.params import (
    LmbookError,
    ParameterError,
    check_choice,
    check_device,
    check_file,
    check_float,
    check_int,
    check_layer,
    check_layers,
    check_parameter_names,
    check_results_dir,
    check_seed,
    check_type,
    declared_parameters,
    read_jsonl,
    read_text,
)
from lmbook.data.word_lists import load_text_lines, load_word_lists

from conftest import one_line


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


def test_checks_name_the_bad_value(tmp_path):
    with pytest.raises(ParameterError, match=r"LAYER=18 is out of range.*0\.\.17"):
        check_layer("LAYER", 18, 18)
    assert check_layer("LAYER", -1, 18) == 17
    with pytest.raises(ParameterError, match="LAYER must be int, got str"):
        check_layer("LAYER", "3", 18)
    with pytest.raises(ParameterError, match="N must be int, got bool"):
        check_int("N", True, 0, 10)
    with pytest.raises(ParameterError, match="N=11 is out of range"):
        check_int("N", 11, 0, 10)
    assert check_float("X", 1, 0, 2) == 1.0
    with pytest.raises(ParameterError, match="choose one of"):
        check_choice("KIND", "c", ["a", "b"])
    assert check_layers("L", None, 3) == [0, 1, 2]
    with pytest.raises(ParameterError, match="empty"):
        check_layers("L", [], 3)
    with pytest.raises(ParameterError, match="no such file"):
        check_file("FACTS_PATH", str(tmp_path / "none.jsonl"))
    assert check_type("S", "x", str) == "x"
