
import pytest

from lmbook import ParameterError
from lmbook.core.params import check_choice, check_file, check_float, check_int, check_layer, check_layers, check_type


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






