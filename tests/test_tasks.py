"""Task files, prompts and accuracy counting (lmbook.data.tasks, chapter 6)."""

import json

import pytest
import torch

from lmbook import ParameterError
from lmbook.core.tokens import answer_token_ids
from lmbook.data.tasks import (
    ARROW,
    accuracy,
    few_shot_prompt,
    few_shot_prompts,
    first_token_correct,
    greedy_match,
    load_tasks,
    prompt_prefix,
    shuffled_few_shot_prompts,
    split_task,
    zero_shot_prompt,
)

from conftest import one_line


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_packaged_tasks_load():
    tasks = load_tasks("data/tasks", min_pairs=25)
    assert len(tasks) >= 7
    for t in tasks.values():
        assert len({x for x, _ in t.pairs}) == len(t.pairs)
    # Hendel et al.'s letter tasks: every letter, and every letter that has a next one
    abc = "abcdefghijklmnopqrstuvwxyz"
    assert tasks["letter_upper"].pairs == tuple((c, c.upper()) for c in abc)
    assert tasks["next_letter"].pairs == tuple(zip(abc[:-1], abc[1:]))
    assert all(len(t) >= 50 for n, t in tasks.items() if n not in ("letter_upper", "next_letter"))


def test_task_field_or_file_stem(tmp_path):
    f = _write(tmp_path / "mine.jsonl", [{"input": "a", "output": "b"}, {"task": "other", "input": "c", "output": "d"}])
    tasks = load_tasks(f)
    assert list(tasks) == ["mine", "other"]
    assert tasks["mine"].pairs == (("a", "b"),) and tasks["other"].pairs == (("c", "d"),)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", r"line 2: not valid JSON"),
        ({"input": "x"}, r"line 2: missing field 'output'"),
        ({"input": "x", "ouput": "y"}, r"line 2: unknown field\(s\) \['ouput'\]"),
        ({"input": "x ", "output": "y"}, r"line 2: 'input' 'x ' has leading or trailing whitespace"),
        ({"input": "x", "output": ""}, r"line 2: 'output' must be a non-empty string"),
        ({"input": "x", "output": 3}, r"line 2: 'output' must be a non-empty string"),
        ({"input": "a", "output": "z"}, r"line 2: input 'a' of task 'f' already appears on line 1"),
        ({"input": "x → y", "output": "z"}, r"line 2: 'input' .* contains a newline or the separator"),
        ("[1, 2]", r"line 2: expected a JSON object"),
    ],
)
def test_bad_lines_are_named(tmp_path, bad, match):
    f = _write(tmp_path / "f.jsonl", [{"input": "a", "output": "b"}, bad])
    with pytest.raises(ParameterError, match=match):
        load_tasks(f)


def test_bad_paths_and_sizes(tmp_path):
    with pytest.raises(ParameterError, match="no such file or folder"):
        load_tasks(tmp_path / "missing.jsonl")
    with pytest.raises(ParameterError, match="without any .jsonl"):
        load_tasks(tmp_path)
    with pytest.raises(ParameterError, match="must be a path"):
        load_tasks(3)
    f = _write(tmp_path / "f.jsonl", [{"input": "a", "output": "b"}])
    with pytest.raises(ParameterError, match="has 1 pairs; at least 5"):
        load_tasks(f, min_pairs=5)


def test_split_is_disjoint_seeded_and_checked(tmp_path):
    f = _write(tmp_path / "t.jsonl", [{"input": f"w{i}", "output": f"v{i}"} for i in range(20)])
    task = load_tasks(f)["t"]
    sp = split_task(task, n_val=4, n_test=6, min_demos=5, seed=1)
    parts = [set(sp.demos), set(sp.val), set(sp.test)]
    assert [len(p) for p in parts] == [10, 4, 6]
    assert set().union(*parts) == set(task.pairs)
    assert split_task(task, 4, 6, 5, seed=1) == sp
    assert split_task(task, 4, 6, 5, seed=2) != sp
    with pytest.raises(ParameterError, match="N_TEST=15 \\+ N_VAL=4"):
        split_task(task, 4, 15, 5)


def test_small_task_shrinks_only_when_asked(tmp_path):
    """26 letters cannot hold 15 validation and 25 test queries: with shrink=True the pool keeps the
    demonstrations it needs and the rest is split in the same proportion, still disjoint."""
    import string

    f = _write(tmp_path / "letters.jsonl", [{"input": c, "output": c.upper()} for c in string.ascii_lowercase])
    task = load_tasks(f)["letters"]
    with pytest.raises(ParameterError, match="N_TEST=25 \\+ N_VAL=15"):
        split_task(task, 15, 25, 8)
    sp = split_task(task, 15, 25, 8, seed=0, shrink=True)
    parts = [set(sp.demos), set(sp.val), set(sp.test)]
    assert [len(p) for p in parts] == [8, 7, 11]
    assert set().union(*parts) == set(task.pairs) and sum(map(len, parts)) == 26
    assert split_task(task, 15, 25, 8, seed=0, shrink=True) == sp
    big = load_tasks(_write(tmp_path / "big.jsonl", [{"input": f"w{i}", "output": f"v{i}"} for i in range(60)]))
    assert split_task(big["big"], 15, 25, 8, shrink=True) == split_task(big["big"], 15, 25, 8), "large tasks unchanged"
    tiny = split_task(task, 1, 1000, 24, shrink=True)
    assert (len(tiny.demos), len(tiny.val), len(tiny.test)) == (24, 1, 1)
    with pytest.raises(ParameterError, match="shrunk: 27"):
        split_task(task, 15, 25, 25, shrink=True)


def test_prompt_format():
    assert zero_shot_prompt("fast") == "fast" + ARROW
    demos = [("hot", "cold"), ("big", "small")]
    assert few_shot_prompt(demos, "fast", prefix="\n") == "\nhot → cold\nbig → small\nfast →"
    pool = [(f"w{i}", f"v{i}") for i in range(6)]
    ps = few_shot_prompts(pool, ["w0", "w1"], k=3, seed=0)
    for q, p in zip(["w0", "w1"], ps):
        lines = p.split("\n")
        assert len(lines) == 4 and lines[-1] == q + ARROW
        assert all(not l.startswith(q + ARROW + " ") for l in lines[:-1]), "the query is never a demonstration"
    assert few_shot_prompts(pool, ["w0", "w1"], k=3, seed=0) == ps


def test_shuffled_prompts_break_every_pair():
    pool = [(f"w{i}", f"v{i}") for i in range(8)]
    for p in shuffled_few_shot_prompts(pool, ["w0", "w1", "w2"], k=4, seed=3):
        for line in p.split("\n")[:-1]:
            x, y = line.split(ARROW + " ")
            assert y != "v" + x[1:], line


def test_accuracy_counts_fixed_outputs():
    pred = torch.tensor([[5, 6, 7, 8], [5, 0, 0, 8]])
    tgt = torch.tensor([5, 6, 9, 8])
    c = first_token_correct(pred, tgt)
    assert c.tolist() == [[True, True, False, True], [True, False, False, True]]
    assert accuracy(c[0]) == 0.75 and accuracy(c[1]) == 0.5 and accuracy(c) == 0.625
    assert accuracy([True, False, False, False]) == 0.25
    assert accuracy([]) != accuracy([])  # NaN for no items


@pytest.mark.parametrize(
    "gen, expected, ok",
    [
        (" cold\nbig", "cold", True),
        ("cold", "cold", True),
        (" cold.", "cold", True),
        (" colder", "cold", False),
        (" Cold", "cold", False),
        (" New Delhi\n", "New Delhi", True),
        (" New York", "New Delhi", False),
        (" CAT", "CAT", True),
        ("", "cold", False),
    ],
)
def test_greedy_match(gen, expected, ok):
    assert greedy_match(gen, expected) is ok


def test_answer_tokens_and_prefix(llama):
    ids = answer_token_ids(llama, ["paris", "rome"])
    assert ids.tolist() == llama.tokenizer(" paris rome", add_special_tokens=False)["input_ids"]
    assert prompt_prefix(llama) == ""  # the tiny tokenizer adds <bos>


def test_tasks_with_bad_bytes(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "\xe9t\xe9", "output": "summer"}\n')
    with pytest.raises(ParameterError, match="TASKS_PATH .*t.jsonl, line 2: not UTF-8") as e:
        load_tasks(f)
    one_line(e)
