"""Checking a chapter's parameters before any heavy work.

Every chapter's second cell calls these on the values papermill injected, so a bad value stops
the run with one message naming the value and what is valid, before a model is loaded or a file
is written. Introduced in chapter 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

__all__ = ["ParameterError", "check_type", "check_int", "check_float", "check_choice", "check_layer",
           "check_layers", "check_file", "check_pairs", "project_path"]


class ParameterError(ValueError):
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
        raise ParameterError(f"{name}={value} is out of range; valid: {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
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
        raise ParameterError(f"{name}={layer} is out of range for a model with {n_layers} layers; valid: 0..{n_layers - 1} (or -{n_layers}..-1)")
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
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise ParameterError(f"{name}[{i}] must be a [prompt, answer] pair of non-empty strings, got {pair!r}")
        out.append((pair[0], pair[1]))
    return out


def read_jsonl(path: Path, name: str = ""):
    """Yield ``(line number, record)`` for each non-blank line of a JSON-lines file. A line that is
    not a JSON object raises :class:`ParameterError` naming the parameter (if given), the file and
    the line."""
    import json

    where = f"{name} {path}" if name else str(path)
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ParameterError(f"{where}, line {lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(rec, dict):
            raise ParameterError(f"{where}, line {lineno}: expected a JSON object, got {type(rec).__name__}: {line[:80]!r}")
        yield lineno, rec
