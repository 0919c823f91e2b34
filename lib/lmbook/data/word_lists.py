"""The steering data files: word lists and neutral text (``data/steering/README.md``).

Introduced in chapter 4 ("Steering by activation addition"), which reads ``WORD_LISTS`` and
``NEUTRAL_TEXT``; chapter 5 reuses the neutral text. Each reader names the parameter, the file and
(where there is one) the line of a bad record.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmbook.core.params import ParameterError, check_file, read_text

__all__ = ["WORD_LIST_KEYS", "load_word_lists", "load_text_lines"]

WORD_LIST_KEYS = ("positive", "negative", "weddings")


def load_word_lists(path: str | Path, name: str = "WORD_LISTS", keys=WORD_LIST_KEYS) -> dict[str, list[str]]:
    """``{key: [word, ...]}`` from a JSON object holding a non-empty list of non-empty strings
    under each of ``keys`` (other keys are kept). Bad bytes, invalid JSON (with its line), a value
    that is not an object, a missing key or a bad entry raise :class:`ParameterError`."""
    path = check_file(name, path)
    text = read_text(path, name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParameterError(f"{name} {path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ParameterError(f"{name} {path}: expected a JSON object with lists under {list(keys)}, "
                             f"got a {type(value).__name__}")
    for key in keys:
        words = value.get(key)
        if not isinstance(words, list) or not words:
            raise ParameterError(f"{name} {path}: needs a non-empty list of words under {key!r}, "
                                 f"got {type(words).__name__ if key in value else 'nothing'}; "
                                 f"keys found: {sorted(value)}")
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w.strip():
                raise ParameterError(f"{name} {path}: {key}[{i}] must be a non-empty string, got {w!r}")
    return value


def load_text_lines(path: str | Path, name: str = "NEUTRAL_TEXT", limit: int = 0) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; the first ``limit`` of them (0: all)."""
    path = check_file(name, path)
    lines = [line.strip() for line in read_text(path, name).splitlines() if line.strip()]
    if not lines:
        raise ParameterError(f"{name}={str(path)!r} has no non-empty lines")
    return lines[:limit] if limit else lines
