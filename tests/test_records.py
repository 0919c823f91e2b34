"""Recorded results (lmbook.core.records)."""

import json
import math

import numpy as np
import pytest
import torch

from lmbook import ParameterError
from lmbook.core.records import Recorder, load_results, to_jsonable


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
