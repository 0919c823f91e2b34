"""Every row of tests/bad_parameters.yaml stops in its chapter's validation cell with one line.

Fast: papermill only injects the parameters (``prepare_only=True``, as ``papermill --prepare-only``),
then the code cells up to and including the validation cell run in this process, in a fresh
namespace, as the kernel would run them; no model is loaded. Two rows also run through a real
kernel, to check that papermill reports the same one-line error there.
"""

from __future__ import annotations

import json
from pathlib import Path

import papermill as pm
import pytest
import torch
import yaml

from lmbook.core.params import LmbookError

from conftest import ROOT

TABLE = Path(__file__).parent / "bad_parameters.yaml"
ROWS = yaml.safe_load(TABLE.read_text(encoding="utf-8"))


def _fill(value, tmp):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


def prepared_cells(stem: str, params: dict, tmp: Path) -> list[str]:
    """Sources of the code cells up to and including the validation cell (the first code cell
    after papermill's injected one) of ``stem`` with ``params`` injected."""
    out = tmp / f"{stem}.prepared.ipynb"
    pm.execute_notebook(str(ROOT / "chapters" / f"{stem}.ipynb"), str(out), parameters=params, prepare_only=True,
                        kernel_name="python3", progress_bar=False, log_output=False)
    cells = json.loads(out.read_text())["cells"]
    injected = next(i for i, c in enumerate(cells) if "injected-parameters" in c["metadata"].get("tags", []))
    validation = next(i for i, c in enumerate(cells) if i > injected and c["cell_type"] == "code")
    return ["".join(c["source"]) for c in cells[: validation + 1] if c["cell_type"] == "code"]


def run_cells(sources: list[str], stem: str) -> dict:
    """Run cell sources in one fresh namespace, keeping IPython's input history ``In``."""
    namespace = {"__name__": "__main__", "In": [""]}
    for src in sources:
        namespace["In"].append(src)
        exec(compile(src, f"<{stem}>", "exec"), namespace)
    return namespace


def run_row(row: dict, tmp: Path) -> BaseException | None:
    """Run a row up to its validation cell; return the exception raised (None if none)."""
    if row.get("file"):
        f = row["file"]
        (tmp / f["name"]).write_bytes(f["text"].encode(f.get("encoding", "utf-8")))
    params = {"RESULTS_DIR": str(tmp / "results"), **_fill(row.get("params", {}), tmp)}
    params[row["parameter"]] = _fill(row["value"], tmp)
    try:
        run_cells(prepared_cells(row["chapter"], params, tmp), row["chapter"])
    except Exception as e:  # noqa: BLE001 - the row decides what is expected
        return e
    return None


def _id(row):
    return f"{row['chapter'][:2]}-{row['parameter']}={str(row['value'])[:30]}"


def test_table_has_every_chapter_and_enough_rows():
    assert len(ROWS) >= 40
    chapters = sorted(p.stem for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
    assert {r["chapter"] for r in ROWS} == set(chapters)
    for r in ROWS:
        assert {"chapter", "parameter", "value", "expect"} <= set(r), r


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_bad_parameter_stops_in_the_validation_cell(row, tmp_path):
    if row.get("unless") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible, so the value is valid here")
    err = run_row(row, tmp_path)
    assert err is not None, f"{row['parameter']}={row['value']!r} passed the validation cell"
    msg = str(err)
    assert isinstance(err, LmbookError), f"a bare {type(err).__name__}: {msg}"
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    assert row["expect"] in msg, f"expected {row['expect']!r} in {msg!r}"
    if row["parameter"] != "RESULTS_DIR":
        assert not (tmp_path / "results").exists(), "nothing may be written for a bad parameter"
    assert not any(p.name.startswith("results") for p in tmp_path.iterdir())


@pytest.mark.parametrize("stem", sorted(p.stem for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")))
def test_default_parameters_pass_the_validation_cell(stem, tmp_path):
    """The same runner accepts each chapter's own defaults (so a row fails for its bad value alone)."""
    run_cells(prepared_cells(stem, {"RESULTS_DIR": str(tmp_path / "results")}, tmp_path), stem)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("param,value,ename,expect", [
    ("MODLE", "smollm2-135m-instruct", "ParameterError", "did you mean MODEL?"),
    ("DEVICE", "cuda:x", "ParameterError", "unknown DEVICE 'cuda:x'"),
    ("model", "smollm2-135m-instruct", "ParameterError", "did you mean MODEL?"),
])
def test_a_kernel_reports_the_same_one_line(param, value, ename, expect, tmp_path):
    """Through papermill and a real kernel, on the notebook cut after its validation cell."""
    nb = json.loads((ROOT / "chapters" / "01_tour.ipynb").read_text())
    cells = nb["cells"]
    params = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    nb["cells"] = cells[: params + 2]
    src = tmp_path / "cut.ipynb"
    src.write_text(json.dumps(nb))
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(src), str(tmp_path / "out.ipynb"),
                            parameters={param: value, "RESULTS_DIR": str(tmp_path / "r")},
                            kernel_name="python3", progress_bar=False, cwd=str(ROOT / "chapters"))
    assert e.value.ename == ename and expect in e.value.evalue and "\n" not in e.value.evalue
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stem", sorted(p.stem for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")))
def test_smoke_parameters_pass_the_validation_cell(stem, tmp_path):
    """The CI smoke runs' small parameters (tests/smoke/) are all accepted, and nothing is written yet."""
    from conftest import smoke_params

    run_cells(prepared_cells(stem, smoke_params(stem, tmp_path / "results"), tmp_path), stem)
    assert not (tmp_path / "results").exists()
