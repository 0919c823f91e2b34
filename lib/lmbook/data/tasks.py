"""In-context learning tasks: loading input/output pairs, building prompts, scoring answers.

Introduced in chapter 6 ("Task vectors"); chapter 7 reads its relations through the same loader.

A *task* is a list of ``(input, output)`` pairs such as ``("hot", "cold")``. Prompts follow
Hendel et al. (2023): one demonstration a line, ``input → output``, and the query last with the
arrow and no answer::

    hot → cold
    big → small
    fast →

The model's answer is what follows the final arrow, so an output is scored as ``" " + output``.

Two ways of scoring, both used by the chapters (``first_token_correct`` is the headline one):

* **first-token match** (:func:`first_token_correct`): the model's top-1 next token equals the first
  token of ``" " + output``. One forward per prompt; what Hendel et al. and Todd et al. report.
  It is lenient for answers that share a first token (``" New"`` for New Delhi and New York).
* **greedy multi-token match** (:func:`greedy_match`): the greedily generated continuation, with
  leading spaces removed, starts with the whole output and the next character (if any) is not a
  letter or digit. Strict, and costs one forward per generated token.

Task files are JSON Lines, one pair a line: ``{"input": "hot", "output": "cold"}`` with an
optional ``"task"`` field; a line without it belongs to the task named after the file (see
``data/tasks/README.md``). :func:`load_tasks` checks every line and names the first bad one.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Sequence

import torch

from lmbook.core.params import ParameterError, check_int, project_path, read_jsonl

__all__ = [
    "ARROW",
    "prompt_prefix",
    "Task",
    "TaskSplit",
    "load_tasks",
    "split_task",
    "zero_shot_prompt",
    "few_shot_prompt",
    "few_shot_prompts",
    "task_vector_prompts",
    "shuffled_few_shot_prompts",
    "first_token_correct",
    "greedy_match",
    "accuracy",
]

ARROW = " →"  # separates an input from its output (one token for both packaged models' tokenizers)
_FIELDS = {"task", "input", "output"}


@dataclasses.dataclass(frozen=True)
class Task:
    """A named list of ``(input, output)`` pairs read from ``source``."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    source: str

    def __len__(self) -> int:
        return len(self.pairs)


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """Disjoint parts of a task: ``demos`` (the pool demonstrations are drawn from), ``val``
    (for choosing a layer) and ``test`` (for the reported accuracy)."""

    task: str
    demos: tuple[tuple[str, str], ...]
    val: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]


def _check_text(value, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(f"{where}: {what} must be a non-empty string, got {value!r}")
    if value != value.strip():
        raise ParameterError(f"{where}: {what} {value!r} has leading or trailing whitespace")
    if "\n" in value or ARROW.strip() in value:
        raise ParameterError(f"{where}: {what} {value!r} contains a newline or the separator '{ARROW.strip()}'")
    return value


def _read_file(path: Path, tasks: dict[str, list[tuple[str, str]]], sources: dict[str, str], name: str) -> None:
    param = name
    seen: dict[tuple[str, str], int] = {}
    for n, row in read_jsonl(path, param):
        where = f"{param} {path}, line {n}"
        extra = set(row) - _FIELDS
        if extra:
            raise ParameterError(f"{where}: unknown field(s) {sorted(extra)}; allowed fields: {sorted(_FIELDS)}")
        for key in ("input", "output"):
            if key not in row:
                raise ParameterError(f"{where}: missing field {key!r}; each line needs 'input' and 'output'")
        task = row.get("task", path.stem)
        _check_text(task, "'task'", where)
        x = _check_text(row["input"], "'input'", where)
        y = _check_text(row["output"], "'output'", where)
        if (task, x) in seen:
            raise ParameterError(f"{where}: input {x!r} of task {task!r} already appears on line {seen[task, x]}")
        seen[task, x] = n
        if task in sources and sources[task] != str(path):
            raise ParameterError(f"{where}: task {task!r} is also defined in {sources[task]}")
        sources[task] = str(path)
        tasks.setdefault(task, []).append((x, y))


def load_tasks(path, min_pairs: int = 1, name: str = "TASKS_PATH") -> dict[str, Task]:
    """Read tasks from a ``.jsonl`` file or from every ``*.jsonl`` file in a folder.

    ``path`` is absolute or relative to the project root. Raises :class:`ParameterError` naming
    the parameter ``name``, the file and line of the first malformed entry (bytes that are not
    UTF-8 included), and for a task with fewer than ``min_pairs`` pairs.
    Returns ``{name: Task}`` in file order.
    """
    param = name
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ParameterError(f"{param} must be a path (str) of a .jsonl task file or a folder of them, "
                             f"got {type(path).__name__} {path!r}")
    p = project_path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise ParameterError(f"{param}={str(path)!r} is a folder without any .jsonl task file")
    elif p.is_file():
        files = [p]
    else:
        raise ParameterError(f"{param}={str(path)!r}: no such file or folder (looked for {p})")
    tasks: dict[str, list[tuple[str, str]]] = {}
    sources: dict[str, str] = {}
    for f in files:
        _read_file(f, tasks, sources, param)
    if not tasks:
        raise ParameterError(f"{param}={str(path)!r} holds no input/output pairs")
    for task, pairs in tasks.items():
        if len(pairs) < min_pairs:
            raise ParameterError(f"{param}: task {task!r} in {sources[task]} has {len(pairs)} pairs; "
                                 f"at least {min_pairs} are needed")
    return {task: Task(task, tuple(pairs), sources[task]) for task, pairs in tasks.items()}


def split_task(task: Task, n_val: int, n_test: int, min_demos: int, seed: int = 0, shrink: bool = False) -> TaskSplit:
    """Shuffle ``task`` (seeded) and cut it into ``test`` (``n_test`` pairs), ``val`` (``n_val``)
    and the remaining ``demos``, which must number at least ``min_demos``.

    A task too small for these sizes raises, unless ``shrink=True``: then the pool keeps exactly
    ``min_demos`` pairs and the rest is split between validation and test in the proportion
    ``n_val : n_test`` (at least one of each), so the three parts stay disjoint. Chapter 6 shrinks
    its letter tasks this way (26 letters cannot hold 15 validation and 25 test queries)."""
    check_int("n_val", n_val, 1)
    check_int("n_test", n_test, 1)
    check_int("min_demos", min_demos, 1)
    need = n_val + n_test + min_demos
    if len(task) < need:
        if not shrink or len(task) < min_demos + 2:
            least = "" if not shrink else f" (shrunk: {min_demos + 2}, one validation and one test query)"
            raise ParameterError(
                f"task {task.name!r} has {len(task)} pairs; N_TEST={n_test} + N_VAL={n_val} + at least "
                f"{min_demos} demonstrations need {need}{least}: lower N_TEST or N_VAL, or add pairs"
            )
        rest = len(task) - min_demos
        n_val = max(1, min(rest - 1, round(rest * n_val / (n_val + n_test))))
        n_test = rest - n_val
    pairs = list(task.pairs)
    random.Random(f"{seed}:{task.name}").shuffle(pairs)
    return TaskSplit(task.name, tuple(pairs[n_test + n_val:]), tuple(pairs[n_test:n_test + n_val]),
                     tuple(pairs[:n_test]))


def prompt_prefix(model_or_tokenizer) -> str:
    """The book's start-token rule (:func:`lmbook.core.tokens.start_token_id`) in text form, for
    prompts built as text: ``""`` when the tokenizer starts every prompt with its own BOS token
    (Gemma; ``start_token_id`` is ``None``), else ``"\n"`` (SmolLM2), so that the first input word
    never sits at position 0.

    The first position of a causal model is special (every head can attend to it; its residual
    stream grows huge, the "attention sink"), and a zero-shot prompt ``"fast →"`` is only two or
    three tokens. Chapter 2 puts the start token itself first (``encode(..., start=True)``);
    chapters 6 and 7 build their prompts as text and keep this newline (their ``PREFIX`` parameter
    overrides it; ``PREFIX=""`` runs without it). Whether a prompt needs a start at all is decided
    in one place, :func:`~lmbook.core.tokens.start_token_id`.
    """
    from lmbook.core.tokens import start_token_id

    return "" if start_token_id(model_or_tokenizer) is None else "\n"


def zero_shot_prompt(query: str, prefix: str = "") -> str:
    """``"fast →"``: the query alone (after ``prefix``, see :func:`prompt_prefix`)."""
    return f"{prefix}{query}{ARROW}"


def few_shot_prompt(demos: Sequence[tuple[str, str]], query: str, prefix: str = "") -> str:
    """Demonstrations one a line (``input → output``), then the query: Hendel et al.'s format."""
    return prefix + "".join(f"{x}{ARROW} {y}\n" for x, y in demos) + zero_shot_prompt(query)


def _draw(pool, k: int, exclude: str, rng: random.Random):
    choices = [p for p in pool if p[0] != exclude]
    if len(choices) < k:
        raise ParameterError(f"need {k} demonstrations but the pool holds only {len(choices)} other pairs")
    return rng.sample(choices, k)


def few_shot_prompts(pool, queries: Sequence[str], k: int, seed: int = 0, prefix: str = "") -> list[str]:
    """One ``k``-shot prompt per query, each with its own demonstrations drawn (seeded) from
    ``pool``, never containing the query itself."""
    check_int("k", k, 0)
    rng = random.Random(seed)
    return [few_shot_prompt(_draw(pool, k, q, rng), q, prefix) for q in queries]


def task_vector_prompts(pool, queries: Sequence[str], k: int, n_dummy: int, seed: int = 0, prefix: str = ""):
    """Hendel et al.'s protocol: for each query, ``k`` demonstrations drawn from ``pool``, the
    few-shot prompt with the query (for in-context accuracy), and ``n_dummy`` prompts with the
    *same* demonstrations but a dummy query in its place (the task vector is read from these, so
    it never sees the query). Returns ``(icl_prompts [Q], dummy_prompts [Q * n_dummy])``, the
    dummy prompts grouped by query. Dummy queries are drawn from the pool, outside the demonstrations."""
    check_int("k", k, 1)
    check_int("n_dummy", n_dummy, 1)
    rng = random.Random(seed)
    icl, dummy = [], []
    for q in queries:
        demos = _draw(pool, k, q, rng)
        used = {x for x, _ in demos} | {q}
        rest = [x for x, _ in pool if x not in used]
        if len(rest) < n_dummy:
            raise ParameterError(f"need {n_dummy} dummy queries besides {k} demonstrations, "
                                 f"but the pool has {len(pool)} pairs")
        icl.append(few_shot_prompt(demos, q, prefix))
        dummy += [few_shot_prompt(demos, d, prefix) for d in rng.sample(rest, n_dummy)]
    return icl, dummy


def shuffled_few_shot_prompts(pool, queries: Sequence[str], k: int, seed: int = 0, prefix: str = "") -> list[str]:
    """Like :func:`few_shot_prompts` but each prompt's demonstration outputs are permuted among
    its inputs, so the demonstrations no longer show the task (Todd et al.'s corrupted prompts).
    A derangement is used where one exists, so no demonstration keeps its own output."""
    check_int("k", k, 2)
    rng = random.Random(seed)
    out = []
    for q in queries:
        demos = _draw(pool, k, q, rng)
        ys = [y for _, y in demos]
        for _ in range(100):
            perm = rng.sample(ys, len(ys))
            if all(a != b for a, b in zip(perm, ys)):
                break
        out.append(few_shot_prompt([(x, y) for (x, _), y in zip(demos, perm)], q, prefix))
    return out


def first_token_correct(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Elementwise ``predicted == targets`` for top-1 token ids of any matching shape (``[..., N]``
    against ``[N]`` broadcasts), as a bool tensor."""
    predicted, targets = torch.as_tensor(predicted), torch.as_tensor(targets)
    return predicted == targets


def greedy_match(generated: str, expected: str) -> bool:
    """Is ``generated`` (a greedy continuation) the answer ``expected``?

    Leading whitespace is ignored; the continuation must start with ``expected`` exactly (case
    included) and the character right after it, if any, must not be a letter or digit, so
    ``" cold\\nbig"`` matches ``"cold"`` but ``" colder"`` does not.
    """
    g = generated.lstrip()
    if not expected or not g.startswith(expected):
        return False
    rest = g[len(expected):]
    return not rest or not rest[0].isalnum()


def accuracy(correct) -> float:
    """Fraction of true values in a bool tensor, array or list (0 items: NaN)."""
    c = torch.as_tensor(correct, dtype=torch.float32) if not isinstance(correct, torch.Tensor) else correct.float()
    return float(c.mean()) if c.numel() else float("nan")
