"""Reading chapter 5's request files (lmbook.data.instructions)."""


import pytest

from lmbook import ParameterError
from lmbook.data.instructions import load_instructions


def test_instructions_name_their_parameter(tmp_path):
    with pytest.raises(ParameterError, match="HARMLESS='.*missing.jsonl': no such file"):
        load_instructions(tmp_path / "missing.jsonl", "HARMLESS")
    f = tmp_path / "h.jsonl"
    f.write_bytes(b'{"id": "a", "instruction": "cr\xe8me", "category": "c", "split": "train"}\n')
    with pytest.raises(ParameterError, match="HARMFUL .*line 1: not UTF-8"):
        load_instructions(f, "HARMFUL")
    f.write_text('{"id": "a", "instruction": "x", "category": "c", "split": "train", "extra": 1}\n')
    with pytest.raises(ParameterError, match=r"HARMFUL .*line 1: unknown field\(s\) \['extra'\]"):
        load_instructions(f)
    from lmbook.experiments.refusal import load_instructions as from_refusal

    assert from_refusal is load_instructions


def test_load_instructions(tmp_path):
    from lmbook.core.params import project_path
    from lmbook.experiments.refusal import load_instructions

    for kind in ("harmful", "harmless"):
        rows = load_instructions(project_path(f"data/instructions/{kind}.jsonl"))
        counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
        assert counts == {"train": 60, "validation": 26, "test": 54}
        assert counts["test"] >= 50, "the chapter reports rates on at least 50 held-out requests of each kind"
    good = '{"id": "a", "instruction": "Bake bread.", "category": "cooking", "split": "train"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + '{"id": "b", "instruction": "x", "category": "c", "split": "dev"}\n')
    with pytest.raises(ParameterError, match="line 2: split 'dev'"):
        load_instructions(bad)
    bad.write_text(good + "\n\n" + "{not json\n")
    with pytest.raises(ParameterError, match="line 3: not valid JSON"):
        load_instructions(bad)
    bad.write_text(good + "\n" + good + "\n")
    with pytest.raises(ParameterError, match="duplicate id"):
        load_instructions(bad)
    with pytest.raises(ParameterError, match="no such file"):
        load_instructions(tmp_path / "missing.jsonl")


def test_a_file_the_book_did_not_write(tmp_path):
    """HARMFUL/HARMLESS take any file of the schema: more requests per split than the book's files and
    categories the book never uses come back as written, in file order."""
    import json

    sizes = {"train": 75, "validation": 33, "test": 90}
    cats = ["gardening", "astronomy", "weather", "sailing"]
    lines, k = [], 0
    for split, n in sizes.items():
        for i in range(n):
            k += 1
            lines.append({"id": f"other-{k:04d}", "instruction": f"Request number {k} about {cats[k % 4]}?",
                          "category": cats[k % 4], "split": split})
    f = tmp_path / "other.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n", encoding="utf-8")
    rows = load_instructions(f, "HARMLESS")
    assert rows == lines
    assert {s: sum(r["split"] == s for r in rows) for s in sizes} == sizes
    assert sorted({r["category"] for r in rows}) == sorted(cats)
