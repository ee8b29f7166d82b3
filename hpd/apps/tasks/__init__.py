"""Bundled verifiable tasks: generators of prompt/reference items plus verifiers.

`math` (arithmetic chains with a written chain of thought; long generation), `code` (one-line
Python functions run against hidden tests in a sandbox; short generation) and `dialogue`
(instructions with checkable constraints; short generation). Items are small enough for
byte-level models of 0.1-2M parameters. `capitals` (capital cities; world knowledge) is for real
pretrained models such as SmolLM2-135M-Instruct. `get_task("math", steps=4)` or `get_task("math:steps=4")`
builds one; `mixed_dataset` draws a shuffled mix; `write_jsonl` writes training rows
`{"prompt", "completion", "task", "answer", "meta"}` (`task_row`) that `hpd.data` loads and that
`task_item` turns back into items, so a data file is all a task's verifier needs (`hpd eval
--data FILE --verifier task`). A row's `task` field goes through `data_task`, which accepts a task
name and the task's problem parameters only (`math:steps=8`): how generated code runs (the
sandbox, its time and memory limits, its workers) is set by whoever runs the command, never by a
data file, so a downloaded file cannot switch the code sandbox off.

    >>> import os, tempfile
    >>> from hpd.apps.tasks import TASKS, get_task, mixed_dataset, write_jsonl
    >>> sorted(TASKS)
    ['capitals', 'code', 'dialogue', 'math']
    >>> items = mixed_dataset({"math": 3, "dialogue": 2}, split="train", seed=0)
    >>> len(items), sorted({i.meta["task"] for i in items})
    (5, ['dialogue', 'math'])
    >>> write_jsonl(items, os.path.join(tempfile.mkdtemp(), "mix.jsonl"))
    5
    >>> task_item(task_row(items[0])) == items[0]
    True
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

from hpd.errors import HPDError
from hpd.apps.tasks.base import SPLITS, Task, TaskItem, split_of
from hpd.apps.tasks.capitals import CapitalsTask
from hpd.apps.tasks.code import CodeTask
from hpd.apps.tasks.dialogue import DialogueTask
from hpd.apps.tasks.math import MathTask, verify_free_form

TASKS: dict[str, type[Task]] = {
    MathTask.name: MathTask,
    CodeTask.name: CodeTask,
    DialogueTask.name: DialogueTask,
    CapitalsTask.name: CapitalsTask,
}

__all__ = [
    "SPLITS", "TASKS", "CapitalsTask", "CodeTask", "DialogueTask", "MathTask", "Task", "TaskItem", "data_task", "get_task",
    "mixed_dataset", "parse_task_spec", "split_of", "task_item", "task_row", "verify_free_form", "write_jsonl",
]


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_task_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split "math:steps=4,max_value=50" into ("math", {"steps": 4, "max_value": 50})."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = part.partition("=")
        if not eq or not key.strip():
            raise HPDError(
                f"bad task parameter {part!r} in {spec!r}: write name:key=value,key=value "
                "(e.g. math:steps=4)"
            )
        params[key.strip()] = _value(val.strip())
    return name.strip(), params


def get_task(name: str, **params: Any) -> Task:
    """Build a task by name, e.g. `get_task("math", steps=4)` or `get_task("math:steps=4")`."""
    base, spec_params = parse_task_spec(name)
    cls = TASKS.get(base)
    if cls is None:
        raise HPDError(f"unknown task {base!r}: choose one of {sorted(TASKS)}")
    try:
        return cls(**{**spec_params, **params})
    except TypeError as e:
        raise HPDError(
            f"task {base!r}: bad parameters {sorted({**spec_params, **params})} ({e}): see the "
            f"docstring of {cls.__module__}.{cls.__name__}"
        ) from None


def data_task(spec: str) -> Task:
    """The task a data row's `task` field names: a task name, with problem parameters at most.

    The options a row may set are the task's problem parameters (the keys of `Task.params`, e.g.
    math's `steps`, code's `kinds` and `max_ops`), which only change what problems look like. Any
    other option (code's `unsafe_no_sandbox`, `timeout_s`, `memory_mb`, `workers`) is refused:
    those weaken or load the verifier and come only from the person running the command (`--task
    SPEC`, the config, `HPD_CODE_UNSAFE_NO_SANDBOX=1`).

        >>> data_task("math:steps=8").steps
        8
        >>> data_task("code:unsafe_no_sandbox=1")
        Traceback (most recent call last):
        hpd.errors.HPDError: the task spec 'code:unsafe_no_sandbox=1' of a data row may set only ...
    """
    base, params = parse_task_spec(spec)
    cls = TASKS.get(base)
    if cls is None:
        raise HPDError(f"unknown task {base!r}: choose one of {sorted(TASKS)}")
    allowed = list(cls().params)
    refused = sorted(set(params) - set(allowed))
    if refused:
        raise HPDError(
            f"the task spec {spec!r} of a data row may set only the problem parameters of {base!r} "
            f"({', '.join(allowed) or 'none'}), not {', '.join(refused)}: how a task's checks run (sandbox, "
            "limits, workers) is set by whoever runs the command (hpd eval --task SPEC, the config; only for "
            "trusted code HPD_CODE_UNSAFE_NO_SANDBOX=1), never by a data file; remove it from the row"
        )
    return get_task(base, **params)


def mixed_dataset(
    tasks: Mapping[str, int],
    split: str,
    seed: int = 0,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[TaskItem]:
    """A shuffled mix: `tasks` maps a task name (or "name:key=value" spec) to a count.

    `params` optionally maps a name to constructor parameters. Deterministic per arguments.
    """
    items: list[TaskItem] = []
    for name, count in tasks.items():
        task = get_task(name, **dict((params or {}).get(name, {})))
        items.extend(task.generate(split, int(count), seed=seed))
    random.Random(f"hpd.tasks.mix/{split}/{seed}").shuffle(items)
    return items


def task_row(item: TaskItem) -> dict[str, Any]:
    """The data row of an item: `{"prompt", "completion", "task", "answer", "meta"}`.

    The reference is the completion; `meta` is the checker's data (hidden tests, constraint kind).
    """
    return {"prompt": item.prompt, "completion": item.reference, "task": item.meta.get("task", ""),
            "answer": item.answer, "meta": item.meta}


def task_item(row: Mapping[str, Any]) -> TaskItem:
    """The item a row written by `task_row` holds (the inverse of `task_row`)."""
    meta = row.get("meta")
    if not isinstance(meta, Mapping):
        raise HPDError("the row has no 'meta' object (the task's checker data that `hpd data` writes): "
                       "write the file again with `hpd data`")
    return TaskItem(str(row.get("prompt", "")), str(row.get("completion", "")), str(row.get("answer", "")), dict(meta))


def write_jsonl(task_items: Iterable[TaskItem], path: str | os.PathLike[str]) -> int:
    """Write one `task_row` per item, as JSON lines; returns the number of rows written.

    Parent directories are created.
    """
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    rows = 0
    with open(path, "w", encoding="utf-8") as f:
        for item in task_items:
            f.write(json.dumps(task_row(item), ensure_ascii=False) + "\n")
            rows += 1
    return rows
