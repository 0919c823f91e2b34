"""Instruction files: the harmful and harmless requests of chapter 5 ("A refusal direction").

Introduced in chapter 5; the schema is documented in ``data/instructions/README.md``. Each line of
a JSON-lines file is one request with string fields ``id``, ``instruction``, ``category`` and
``split`` (one of :data:`SPLITS`).
"""

from __future__ import annotations

from pathlib import Path

from lmbook.core.params import ParameterError, check_file, read_jsonl

__all__ = ["SPLITS", "INSTRUCTION_FIELDS", "load_instructions"]

SPLITS = ("train", "validation", "test")
INSTRUCTION_FIELDS = ("id", "instruction", "category", "split")


def load_instructions(path: str | Path, name: str = "HARMFUL") -> list[dict]:
    """Read an instruction file; ``name`` is the parameter that gave the path (``HARMFUL`` or
    ``HARMLESS``), named with the file and the line by every error: a missing file, bytes that
    are not UTF-8, a line that is not a JSON object, a missing, empty or unknown field, a split
    not in :data:`SPLITS`, a duplicate id, a file without requests."""
    path = check_file(name, path)
    rows, seen = [], {}
    for n, row in read_jsonl(path, name):
        where = f"{name} {path}, line {n}"
        for key in INSTRUCTION_FIELDS:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ParameterError(f"{where}: field {key!r} must be a non-empty string, got {row.get(key)!r}")
        extra = set(row) - set(INSTRUCTION_FIELDS)
        if extra:
            raise ParameterError(f"{where}: unknown field(s) {sorted(extra)}; "
                                 f"allowed fields: {list(INSTRUCTION_FIELDS)}")
        if row["split"] not in SPLITS:
            raise ParameterError(f"{where}: split {row['split']!r} is not one of {list(SPLITS)}")
        if row["id"] in seen:
            raise ParameterError(f"{where}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = n
        rows.append(row)
    if not rows:
        raise ParameterError(f"{name} {path}: the file holds no instructions")
    return rows
