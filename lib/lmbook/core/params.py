"""Checking a chapter's parameters before any heavy work.

Every chapter's second cell calls these on the values papermill injected, so a bad value stops
the run with one message naming the value and what is valid, before a model is loaded or a file
is written. Introduced in chapter 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

__all__ = ["LmbookError", "ParameterError", "check_type", "check_int", "check_float", "check_choice", "check_layer",
           "check_layers", "check_file", "check_pairs", "project_path", "check_seed", "check_device",
           "check_results_dir", "check_parameter_names", "declared_parameters", "read_jsonl", "read_text",
           "MAX_SEED"]

MAX_SEED = 2**32 - 1  # NumPy's seed range; torch and Python accept it too


class LmbookError(Exception):
    """Base of the library's own errors: each carries one line that says what went wrong and what to do."""


class ParameterError(LmbookError, ValueError):
    """A chapter parameter or library argument with a bad value."""


def _tname(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def check_type(name: str, value: Any, types) -> Any:
    """``value`` must be an instance of ``types`` (bool is not accepted as an int)."""
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        raise ParameterError(f"{name} must be {_tname(types)}, got {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer in ``[lo, hi]`` (either bound may be None)."""
    check_type(name, value, int)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        low, high = lo if lo is not None else "-inf", hi if hi is not None else "inf"
        raise ParameterError(f"{name}={value} is out of range; valid: {low}..{high}")
    return value


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """A real number in ``[lo, hi]``; ints are accepted and converted."""
    check_type(name, value, (int, float))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ParameterError(f"{name}={value} is out of range; valid: {lo}..{hi}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ParameterError(f"{name}={value!r} is not valid; choose one of {choices}")
    return value


def check_layer(name: str, layer: Any, n_layers: int) -> int:
    """A layer index in ``[-n_layers, n_layers)``; returned non-negative."""
    check_type(name, layer, int)
    if not -n_layers <= layer < n_layers:
        raise ParameterError(f"{name}={layer} is out of range for a model with {n_layers} layers; "
                             f"valid: 0..{n_layers - 1} (or -{n_layers}..-1)")
    return layer % n_layers


def check_layers(name: str, layers: Any, n_layers: int) -> list[int]:
    """``None`` (all layers), one layer, or a list of layers; each checked by :func:`check_layer`."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        return [check_layer(name, layers, n_layers)]
    check_type(name, layers, (list, tuple, range))
    out = [check_layer(f"{name}[{i}]", l, n_layers) for i, l in enumerate(layers)]
    if not out:
        raise ParameterError(f"{name} is empty; give at least one layer in 0..{n_layers - 1}")
    return out


def project_path(path: str | Path) -> Path:
    """A path as given if absolute, else relative to the project's root folder."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    from lmbook import PROJECT_ROOT

    return PROJECT_ROOT / p


def check_file(name: str, path: Any) -> Path:
    """An existing file, given as an absolute path or relative to the project root."""
    check_type(name, path, (str, Path))
    p = project_path(path)
    if not p.is_file():
        raise ParameterError(f"{name}={str(path)!r}: no such file (looked for {p})")
    return p


def check_pairs(name: str, value: Any, min_len: int = 1) -> list[tuple[str, str]]:
    """A list of ``[prompt, answer]`` string pairs (at least ``min_len`` of them)."""
    check_type(name, value, (list, tuple))
    if len(value) < min_len:
        raise ParameterError(f"{name} needs at least {min_len} [prompt, answer] pairs, got {len(value)}")
    out = []
    for i, pair in enumerate(value):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        if not (ok and all(isinstance(x, str) and x.strip() for x in pair)):
            raise ParameterError(f"{name}[{i}] must be a [prompt, answer] pair of non-empty strings, got {pair!r}")
        out.append((pair[0], pair[1]))
    return out


def read_text(path: Path, name: str = "") -> str:
    """A text file's contents as UTF-8. Bytes that are not UTF-8 raise :class:`ParameterError`
    naming the parameter (if given), the file and the line of the first bad byte."""
    where = f"{name} {path}" if name else str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ParameterError(f"{where}: cannot be read ({type(e).__name__}: {e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ParameterError(f"{where}, line {lineno}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} "
                             f"at offset {e.start}); save the file as UTF-8") from None


def read_jsonl(path: Path, name: str = ""):
    """Yield ``(line number, record)`` for each non-blank line of a JSON-lines file. A line that is
    not a JSON object, or bytes that are not UTF-8, raise :class:`ParameterError` naming the
    parameter (if given), the file and the line."""
    import json

    where = f"{name} {path}" if name else str(path)
    for lineno, line in enumerate(read_text(path, name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ParameterError(f"{where}, line {lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(rec, dict):
            raise ParameterError(f"{where}, line {lineno}: expected a JSON object, "
                                 f"got {type(rec).__name__}: {line[:80]!r}")
        yield lineno, rec


def check_seed(value: Any, name: str = "SEED") -> int:
    """A seed every generator accepts: an integer in ``0..2**32-1``."""
    return check_int(name, value, 0, MAX_SEED)


def check_device(name: str, value: Any) -> str:
    """``"auto"``, ``"cpu"``, ``"mps"``, ``"cuda"`` or ``"cuda:N"``, and present on this machine:
    ``cuda`` needs a visible GPU, ``cuda:N`` a GPU with index N. Returns the value unchanged."""
    valid = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    if not isinstance(value, str):
        raise ParameterError(f"{name} must be a string such as {valid}, got {type(value).__name__} {value!r}")
    if value in ("auto", "cpu"):
        return value
    import torch

    kind, colon, index = value.partition(":")
    if kind == "mps" and not colon:
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ParameterError(f"{name}={value!r}: no MPS device on this machine; use 'auto' or 'cpu'")
        return value
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ParameterError(f"unknown {name} {value!r}; use {valid}")
    if not torch.cuda.is_available():
        raise ParameterError(f"{name}={value!r} but this machine has no usable CUDA GPU; use 'auto' or 'cpu'")
    n = torch.cuda.device_count()
    if index and int(index) >= n:
        raise ParameterError(f"{name}={value!r}: this machine has {n} GPU(s); valid: 'cuda' or cuda:0..cuda:{n - 1}")
    return value


DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(name: str, value: Any) -> str:
    """One of :data:`DTYPES` (a model's parameter dtype, by name). Returns the value unchanged."""
    if value not in DTYPES:
        raise ParameterError(f"unknown {name} {value!r}; valid: {', '.join(repr(d) for d in DTYPES)}")
    return value


def check_results_dir(name: str, value: Any) -> Path:
    """A folder results can be written to, without creating or writing anything now: a non-empty
    path (absolute or relative to the project root) that is an existing writable folder, or that
    does not exist yet below a writable folder. Returns the resolved path."""
    import os

    check_type(name, value, (str, Path))
    if not str(value).strip():
        raise ParameterError(f"{name} is empty; give a folder for the results, e.g. '_build/results'")
    p = project_path(value)
    probe = p
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise ParameterError(f"{name}={str(value)!r}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == p else f"lies below {probe}, which is a file"
        raise ParameterError(f"{name}={str(value)!r} {what}, not a folder; give a folder for the results")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "folder" if probe == p else f"folder above it, {probe},"
        raise ParameterError(f"{name}={str(value)!r}: the {what} is not writable; give a folder you can write to")
    return p


def _notebook(stem: str) -> list[dict]:
    import json

    from lmbook import PROJECT_ROOT

    return json.loads((PROJECT_ROOT / "chapters" / f"{stem}.ipynb").read_text(encoding="utf-8"))["cells"]


def _bound_names(source: str) -> list[str]:
    """Names a cell binds at top level (assignments, imports, loops, definitions), in order."""
    import ast

    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(a.asname or a.name).split(".")[0] for a in node.names]
    return list(dict.fromkeys(names))


def declared_parameters(stem: str) -> list[str]:
    """Names assigned in the ``parameters`` cell of ``chapters/<stem>.ipynb``, in order."""
    cell = next(c for c in _notebook(stem) if "parameters" in c.get("metadata", {}).get("tags", []))
    return _bound_names("".join(cell["source"]))


def check_parameter_names(namespace: dict, stem: str) -> None:
    """Fail on a parameter name that the chapter does not declare, naming the closest valid one.

    ``namespace`` is the notebook's ``globals()`` when the validation cell starts: the parameters
    cell and papermill's injected cell have defined every name in it. A misspelt parameter
    (``-p MODLE x``, ``-p model x``) would only get a warning from papermill while the chapter
    runs on its defaults. Flagged are the names papermill's injected cell (the cell in IPython's
    input history ``In`` that starts with ``# Parameters``) binds that the parameters cell of
    ``chapters/<stem>.ipynb`` does not declare, and any upper-case name that no cell of the
    chapter binds. Names bound by later cells are allowed otherwise, so that the validation cell
    can be run again in an interactive session.
    """
    import difflib
    import re

    cells = _notebook(stem)
    declared = declared_parameters(stem)
    known = set()
    for c in cells:
        if c.get("cell_type") == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", []):
            known.update(_bound_names("".join(c["source"])))
    injected = set()
    history = namespace.get("In")
    if isinstance(history, list):
        for src in history:
            if isinstance(src, str) and src.lstrip().startswith("# Parameters"):
                injected.update(_bound_names(src))
    for key in list(namespace):
        if key.startswith("_") or key in declared:
            continue
        if key in injected or (re.fullmatch(r"[A-Z][A-Z0-9_]*", key) and key not in known):
            close = difflib.get_close_matches(key.upper(), declared, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            shown = repr(namespace[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ParameterError(f"unknown parameter {key}={shown}; {hint}valid parameters: {', '.join(declared)}")
