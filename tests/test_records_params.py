import json
import math

import numpy as np
import pytest
import torch

from lmbook import ParameterError
from lmbook.core.params import check_choice, check_file, check_float, check_int, check_layer, check_layers, check_type
from lmbook.core.plotting import model_color
from lmbook.core.stats import bootstrap_ci
from lmbook.core.records import Recorder, load_results, to_jsonable
from lmbook.core.seeding import set_seed


def test_recorder_round_trip(tmp_path):
    rec = Recorder("ch", tmp_path, glue=False)
    rec.record("n", np.int64(3))
    rec.record("p", torch.tensor(0.25))
    rec.record("curve", torch.arange(3.0))
    rec.record("nan", float("nan"))
    got = load_results("ch", tmp_path)
    assert got == {"n": 3, "p": 0.25, "curve": [0.0, 1.0, 2.0], "nan": None}
    assert json.loads((tmp_path / "ch.json").read_text()) == got
    assert [p.name for p in tmp_path.iterdir()] == ["ch.json"]


def test_recorder_rejects_unserialisable(tmp_path):
    with pytest.raises(ParameterError, match="cannot record"):
        Recorder("ch", tmp_path, glue=False).record("x", object())
    with pytest.raises(ParameterError, match="no recorded results"):
        load_results("missing", tmp_path)


def test_to_jsonable_nested():
    assert to_jsonable({"a": (np.float32(0.5), [math.inf])}) == {"a": [0.5, [None]]}


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


def test_set_seed_is_reproducible():
    set_seed(3)
    a = torch.rand(3)
    set_seed(3)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ParameterError):
        set_seed(-1)


def test_bootstrap_ci_contains_the_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small, big = rng.normal(size=20), rng.normal(size=2000)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi
    _, lo2, hi2 = bootstrap_ci(big)
    assert hi2 - lo2 < hi - lo
    m, lo, hi = bootstrap_ci(np.ones((5, 3)))
    assert np.allclose(m, 1) and np.allclose(lo, 1) and np.allclose(hi, 1)


def test_model_colors_are_stable():
    assert model_color("gemma-3-270m") != model_color("smollm2-135m-instruct")
    assert model_color("org/x") == model_color("org/x")
