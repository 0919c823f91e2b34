import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = Path(__file__).parent / "smoke"
CHAPTERS = sorted(p.stem for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))


def smoke_params(stem: str, results_dir: Path) -> dict:
    """A chapter's small CI parameters, from tests/smoke/<stem>.yaml, writing results to ``results_dir``."""
    path = SMOKE / f"{stem}.yaml"
    assert path.is_file(), f"every chapter needs smoke parameters in {path}"
    params = yaml.safe_load(path.read_text()) or {}
    params["RESULTS_DIR"] = str(results_dir)
    return params


@dataclasses.dataclass
class SmokeRun:
    notebook: Path  # the executed notebook
    results: dict  # what the chapter recorded
    params: dict  # the parameters it ran with


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``smoke_run(stem)`` executes a chapter once per session with its smoke parameters (papermill)."""
    import papermill as pm

    out = tmp_path_factory.mktemp("smoke")
    done: dict[str, SmokeRun] = {}

    def run(stem: str) -> SmokeRun:
        if stem not in done:
            params = smoke_params(stem, out / "results")
            nb = out / "chapters" / f"{stem}.ipynb"
            nb.parent.mkdir(parents=True, exist_ok=True)
            pm.execute_notebook(str(ROOT / "chapters" / f"{stem}.ipynb"), str(nb), parameters=params,
                                kernel_name="python3", progress_bar=False, cwd=str(ROOT / "chapters"))
            done[stem] = SmokeRun(nb, json.loads((out / "results" / f"{stem}.json").read_text()), params)
        return done[stem]

    return run


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny random checkpoint per family: ``{family: folder}``."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: tiny.build(f, root / f) for f in tiny.FAMILIES}


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("LMBOOK_TEST_DEVICE", "cpu"),
                     help="device the tiny test models are loaded on: cpu (default), auto or cuda "
                          "(bench/gpu_check.py runs the unit tests with --device auto)")


@pytest.fixture(scope="session")
def test_device(request) -> str:
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs, test_device):
    """Each tiny checkpoint loaded through ``load_model``, as any local model would be, on the
    device the run asks for (``--device``; float32 everywhere, so tolerances hold on a GPU too)."""
    import torch

    from lmbook.core.models import load_model

    return {f: load_model(str(d), device=test_device, dtype=torch.float32) for f, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def llama(tiny_models):
    return tiny_models["llama"]


PROMPTS = [
    "the eiffel tower is located in the city of",
    "michael jordan plays the sport of",
    "the capital of italy is",
]

def one_line(excinfo) -> str:
    """The message of a raised error, checked to be one line (the book's errors are)."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def glued(monkeypatch):
    """What the recorder glues, as ``{key: value}`` (myst_nb.glue replaced, no kernel needed)."""
    import myst_nb

    out = {}
    monkeypatch.setattr(myst_nb, "glue", lambda key, value, display=True: out.__setitem__(key, str(value)))
    return out
