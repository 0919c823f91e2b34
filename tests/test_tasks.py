"""Task files, prompts and accuracy counting (lmbook.data.tasks, chapter 6)."""

import json

import pytest
import torch

from lmbook import ParameterError
from lmbook.data.tasks import (
    ARROW,
    accuracy,
    answer_token_ids,
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


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_packaged_tasks_load():
    tasks = load_tasks("data/tasks", min_pairs=50)
    assert len(tasks) >= 5
    for t in tasks.values():
        assert len({x for x, _ in t.pairs}) == len(t.pairs)


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


def test_prompt_format():
    assert zero_shot_prompt("fast") == "fast" + ARROW
    assert few_shot_prompt([("hot", "cold"), ("big", "small")], "fast", prefix="\n") == "\nhot → cold\nbig → small\nfast →"
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
