"""Recording a chapter's headline results.

Introduced in chapter 1. ``Recorder.record(key, value)`` does two things: it writes the value to
``<results_dir>/<chapter>.json`` (read by the tests, by other chapters, and by anyone rerunning a
chapter with papermill), and it *glues* it into the notebook so the book's text can quote it with
``{glue:text}`key:format``` instead of a number typed by hand.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmbook.core.params import ParameterError, check_type, project_path

__all__ = ["Recorder", "load_results", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Tensors, NumPy scalars/arrays and nested containers to plain JSON values (NaN -> None)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise ParameterError(f"cannot record a value of type {type(value).__name__}: {value!r}")


class _Plain(str):
    """A string whose display is the text itself, without quotes (for glued words in prose)."""

    def __repr__(self) -> str:
        return str(self)


class Recorder:
    """Collects ``key -> value`` for one chapter; see the module docstring."""

    def __init__(self, chapter: str, results_dir: str | Path, glue: bool = True):
        check_type("chapter", chapter, str)
        check_type("RESULTS_DIR", results_dir, (str, Path))
        self.chapter = chapter
        self.path = project_path(results_dir) / f"{chapter}.json"
        self.glue = glue
        self.results: dict[str, Any] = {}

    def record(self, key: str, value: Any, glue: bool | None = None) -> Any:
        """Store ``value`` under ``key``, save the chapter's file, and glue scalars and strings."""
        check_type("key", key, str)
        self.results[key] = to_jsonable(value)
        self._save()
        shown = self.results[key]
        if shown is None:
            shown = float("nan")  # a missing number (NaN, or None) reads "nan" in the text, whatever its format
        if (self.glue if glue is None else glue) and isinstance(shown, (int, float, str)):
            from myst_nb import glue as nb_glue

            nb_glue(key, _Plain(shown) if isinstance(shown, str) else shown, display=False)
        return value

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.chapter}.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.results, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def load_results(chapter: str, results_dir: str | Path) -> dict[str, Any]:
    """The results a chapter recorded, as saved by :class:`Recorder`."""
    path = project_path(results_dir) / f"{chapter}.json"
    if not path.is_file():
        raise ParameterError(f"no recorded results for chapter {chapter!r} at {path}; run the chapter first")
    return json.loads(path.read_text())
