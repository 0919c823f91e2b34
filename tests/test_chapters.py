"""Chapter smoke runs (papermill with small parameters from tests/smoke/), assertions on the
results each chapter recorded, nbval on the executed notebooks, and the book build.

Marked ``chapters`` / ``book``; ``make test-unit`` skips them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest
import yaml

from conftest import CHAPTERS, ROOT, smoke_params

pytestmark = pytest.mark.chapters


def test_every_chapter_has_a_parameters_cell_and_no_outputs():
    for stem in CHAPTERS:
        nb = json.loads((ROOT / "chapters" / f"{stem}.ipynb").read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{stem}: exactly one cell tagged 'parameters'"
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        for c in nb["cells"]:
            if c["cell_type"] == "code":
                assert not c.get("outputs") and c.get("execution_count") is None, f"{stem}: commit notebooks stripped"


@pytest.mark.parametrize("stem", CHAPTERS)
def test_reader_sees_the_parameters_not_the_set_up(stem):
    """The parameters cell stays visible; the validation cell after it and the set-up cell are collapsed
    (hide-input) or removed (remove-input), and so is the code of every cell that only draws a figure."""
    cells = json.loads((ROOT / "chapters" / f"{stem}.ipynb").read_text())["cells"]
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in cells]
    hidden = {"hide-input", "remove-input", "hide-cell", "remove-cell"}
    ip = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert not tags[ip] & hidden, f"{stem}: the parameters cell is what a reader changes; keep it visible"
    validation = next(i for i in range(ip + 1, len(cells)) if cells[i]["cell_type"] == "code")
    setup_md = next(i for i, c in enumerate(cells)
                    if c["cell_type"] == "markdown" and "".join(c["source"]).startswith("## Set-up"))
    setup = next(i for i in range(setup_md + 1, len(cells)) if cells[i]["cell_type"] == "code")
    for i, what in [(validation, "parameter-validation"), (setup, "set-up")]:
        assert tags[i] & hidden, f"{stem}: tag the {what} cell {cells[i].get('id')} hide-input (or remove-input)"
    for c, t in zip(cells, tags):
        src = "".join(c["source"])
        if c["cell_type"] == "code" and src.lstrip().startswith("fig, ") and "rec.record" not in src:
            assert t & hidden, f"{stem}: cell {c.get('id')} only draws a figure; tag it hide-input"


@pytest.mark.parametrize("stem", CHAPTERS)
def test_every_chapter_has_smoke_assertions(stem):
    """Each chapter's recorded results are checked in tests/test_chNN_*.py through the smoke_run fixture."""
    nn = stem.split("_")[0]
    files = list(Path(__file__).parent.glob(f"test_ch{nn}_*.py"))
    assert files and any("smoke_run(" in f.read_text() for f in files), f"add tests/test_ch{nn}_<slug>.py for {stem}"


@pytest.mark.parametrize("stem", CHAPTERS)
def test_unknown_model_fails_at_once(stem, tmp_path):
    params = smoke_params(stem, tmp_path / "results")
    params["MODEL"] = "no-such-model"
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "chapters" / f"{stem}.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters=params, kernel_name="python3", progress_bar=False)
    assert e.value.ename == "ModelNotAvailableError"
    assert "gemma-3-270m" in e.value.evalue and "smollm2-135m-instruct" in e.value.evalue
    nb = json.loads((tmp_path / "out.ipynb").read_text())
    failed = [i for i, c in enumerate(nb["cells"])
              if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
    injected = next(i for i, t in enumerate(tags) if "injected-parameters" in t)
    validation = next(i for i, c in enumerate(nb["cells"]) if i > injected and c["cell_type"] == "code")
    assert failed == [validation], "the validation cell, before any model is loaded, must fail"
    assert not (tmp_path / "results").exists(), "nothing may be written for a bad parameter"


def test_nbval_on_smoke_notebooks(smoke_run):
    notebooks = [str(smoke_run(stem).notebook) for stem in CHAPTERS]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-sanitize-with", str(Path(__file__).parent / "sanitize.cfg"), *notebooks],
        capture_output=True, text=True, cwd=str(Path(notebooks[0]).parent),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


@pytest.fixture(scope="module")
def smoke_book(smoke_run, tmp_path_factory):
    """The whole book (config, toc, intro, references, every chapter) built with -W, using the
    smoke-executed notebooks instead of executing the full chapters again: (process, html folder)."""
    book = tmp_path_factory.mktemp("book")
    shutil.copytree(ROOT, book, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".venv", "_build", ".git", ".pytest_cache", "chapters", "__pycache__",
                                                  "*.egg-info"))
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    (book / "_config.yml").write_text(yaml.safe_dump(config))
    (book / "chapters").mkdir(exist_ok=True)
    for stem in CHAPTERS:
        shutil.copy(smoke_run(stem).notebook, book / "chapters" / f"{stem}.ipynb")
    proc = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(book), "-W", "--keep-going"],
                          capture_output=True, text=True)
    return proc, book / "_build" / "html"


@pytest.mark.book
def test_book_builds_with_warnings_as_errors(smoke_book):
    proc, html = smoke_book
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for stem in CHAPTERS:
        page = (html / "chapters" / f"{stem}.html").read_text()
        assert "<img" in page, f"{stem}: the rendered chapter shows its figures"
    assert (html / "intro.html").is_file()


@pytest.mark.book
def test_book_reads_cleanly_in_a_browser(smoke_book):
    """Every page of the smoke-built book in headless Chromium (tests/browser_check.py): no JavaScript
    error, missing image, broken internal link or anchor, unrendered glue, or code scrolling sideways.
    Screenshots of each page go to _build/screenshots/."""
    import browser_check

    if browser_check.find_chromium() is None:
        pytest.skip(browser_check.INSTALL_HINT)
    proc, html = smoke_book
    if proc.returncode != 0:
        pytest.fail("the book did not build (see test_book_builds_with_warnings_as_errors)")
    results = browser_check.check_book(html, ROOT / "_build" / "screenshots")
    assert len(results) >= len(CHAPTERS) + 2, sorted(results)
    bad = {page: problems for page, problems in results.items() if problems}
    assert not bad, "\n".join(f"{page}:\n  " + "\n  ".join(problems) for page, problems in bad.items())
