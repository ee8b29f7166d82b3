"""The `Task` contract: seeded generators of (prompt, reference) items plus a verifier.

A task draws problems from a seeded `random.Random` (`Task.sample`); `Task.generate` turns draws
into a split: each candidate goes to `train`, `val` (10% of prompts, for choosing hyperparameters;
a task with a small prompt space may have none) or `test` (20%) by a hash of its prompt (so the
splits can never share a prompt, whatever the seeds; a task may split by something coarser that
its prompts name, `Task.split_of_item`: `capitals` splits by country), duplicates are dropped, and
the same `(split, n, seed)` always gives the same list (and a shorter list is a prefix of a longer
one).
`Task.verify` scores one completion; `Task.verify_batch` scores many (the code task runs them in
parallel sandboxes).

    >>> from hpd.apps.tasks import get_task
    >>> task = get_task("math", steps=2)
    >>> items = task.generate("train", 3, seed=0)
    >>> len(items), len({i.prompt for i in items})
    (3, 3)
    >>> task.verify(items[0], items[0].reference)
    True
"""

from __future__ import annotations

import hashlib
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hpd.errors import HPDError

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Share of the prompt space that belongs to the held-out split.
TEST_FRACTION = 0.2
# Share of the prompt space held out for validation (choosing learning rates in `hpd bench`): never
# trained on by anything the project builds (teacher, shipped students), never a test problem.
VAL_FRACTION = 0.1
# When `generate` concludes the prompt space is exhausted: too many draws in all, or this many
# draws in a row that gave nothing new.
ATTEMPTS_PER_ITEM = 200
MAX_CONSECUTIVE_MISSES = 20_000


@dataclass(frozen=True)
class TaskItem:
    """One problem: the prompt, the reference completion, the short answer, and checker data.

    `meta` holds what the verifier needs beyond the reference (hidden tests, the instruction kind,
    the task name under "task"); it is JSON-serializable.
    """

    prompt: str
    reference: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def split_of(prompt: str, val_fraction: float = VAL_FRACTION) -> str:
    """The split a prompt belongs to, from a hash of its text (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    u = h / 2**64
    return "test" if u < TEST_FRACTION else "val" if u < TEST_FRACTION + val_fraction else "train"


class Task(ABC):
    """A generator of verifiable problems. Subclasses set `name` and implement `sample`/`verify`.

    `max_new_tokens` is the generation budget evaluation uses by default: enough for the longest
    reference with a byte-level tokenizer, plus slack.
    """

    name: ClassVar[str] = ""
    max_new_tokens: int = 64
    # The share of prompts kept for the `val` split (0: no validation split, all non-test is train).
    val_fraction: ClassVar[float] = VAL_FRACTION

    @property
    def params(self) -> dict[str, Any]:
        """The parameters that shape the problem distribution (part of the generator's seed).

        A data row's task spec may set these and nothing else (`hpd.apps.tasks.data_task`), so
        they must never say how a completion is checked (a sandbox, a limit): those weaken the
        checks and come only from the person running the command."""
        return {}

    def preflight(self) -> None:
        """Raise HPDError if this machine cannot verify (the code task: no sandbox); else nothing."""

    @abstractmethod
    def sample(self, rng: random.Random) -> TaskItem:
        """Draw one candidate problem (any split; `generate` does the filtering)."""

    @abstractmethod
    def verify(self, item: TaskItem, completion: str) -> bool:
        """Whether `completion` solves `item`."""

    def partial_credit(self, item: TaskItem, completion: str) -> float | None:
        """A graded score in [0, 1] beside the pass/fail verdict, or None where the task has none.

        For answers that are all-or-nothing over many steps (a long chain is right only if every
        step is), this says how far a model got, which separates models that all fail the whole."""
        return None

    def split_of_item(self, item: TaskItem) -> str:
        """The split `item` belongs to: by a hash of its prompt (`split_of`) unless a task says otherwise."""
        return split_of(item.prompt, self.val_fraction)

    def verify_batch(self, items: Sequence[TaskItem], completions: Sequence[str]) -> list[bool]:
        """Score many completions; the result is in input order."""
        if len(items) != len(completions):
            raise HPDError(
                f"{self.name}: {len(items)} items but {len(completions)} completions: pass one "
                "completion per item"
            )
        return [self.verify(i, c) for i, c in zip(items, completions)]

    def generate(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        """`n` distinct items of `split` ("train", "val" or "test"), deterministic per (split, n, seed).

        Raises `HPDError` when the problem space of this split holds fewer than `n` prompts.
        """
        if split not in SPLITS:
            raise HPDError(f"unknown split {split!r}: use one of {list(SPLITS)}")
        if n < 0:
            raise HPDError(f"n must be non-negative, got {n}")
        # A string seed is hashed with SHA-512 by `random`, so the stream is stable across runs;
        # the parameters are part of it so that e.g. steps=3 and steps=4 draw independently.
        key = json.dumps([self.name, self.params, split, seed], sort_keys=True, default=str)
        rng = random.Random(key)
        items: list[TaskItem] = []
        seen: set[str] = set()
        attempts = misses = 0
        budget = ATTEMPTS_PER_ITEM * n + 1000
        while len(items) < n:
            attempts += 1
            if attempts > budget or misses > MAX_CONSECUTIVE_MISSES:
                raise HPDError(
                    f"{self.name}: found only {len(items)} distinct {split} prompts of the {n} "
                    f"asked for (params {self.params}): ask for fewer items or widen the task "
                    "(e.g. more steps or more kinds)"
                )
            item = self.sample(rng)
            if item.prompt in seen or self.split_of_item(item) != split:
                misses += 1
                continue
            misses = 0
            seen.add(item.prompt)
            items.append(item)
        return items
