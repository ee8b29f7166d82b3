"""Verifiers for a user's own data: does a completion solve the problem of a data row?

`get_verifier(spec)` builds one from a short spec; `.verify_batch(rows, completions)` returns one
bool per row, in input order. A row is a dict as in the data file (`prompt`, and what the verifier
reads):

- `exact`: the final answer extracted from the completion (the last match of `answer_pattern`,
  default the bundled tasks' `Answer: ...` marker, else the last non-empty line) equals the row's
  `answer`, both stripped and compared case-insensitively;
- `math`: the completion's final answer equals the row's `answer` mathematically ("1/2" = "0.5",
  LaTeX, boxed), through math-verify (`hpd.apps.tasks.verify_free_form`), in a helper process with
  a deadline (2 s): an answer that takes longer (`9^9^9^9`) is wrong, from any thread;
- both take the reference's final answer from the row's `completion` (a training row) when it has
  no `answer`: extracted as from a completion (`exact`), or the text after its last `Answer:`
  marker, else its last `\boxed{}`, else its last number (`math`);
- `task`: rows written by `hpd data` (`task`, `answer`, `meta`), checked by that bundled task's own
  verifier, so the bundled tasks are data files plus this verifier; a row's `task` names a task
  and problem parameters only (`hpd.apps.tasks.data_task`): an option such as
  `code:unsafe_no_sandbox=1` in a data file is refused, naming the row;
- `MODULE:FUNCTION` or `path/to/file.py:FUNCTION`: `FUNCTION(row: dict, completion: str) -> bool`.

`VerifierReward(verifier)` makes one a reward function for TRL's `GRPOTrainer` (1.0 solved, 0.0
not), reading the dataset's columns as the rows and counting the completion tokens it scores.

Errors are `HPDError`s with one line: an unknown kind (with a did-you-mean), a module that does not
import, a row without the field a verifier reads, a verifier that raises (naming it and the row).

    >>> from hpd.apps.verifiers import get_verifier
    >>> v = get_verifier("exact")
    >>> v.verify_batch([{"prompt": "2+2?", "answer": "4"}] * 3, ["so... Answer: 4", "Answer: 5", "4"])
    [True, False, True]
    >>> get_verifier("math").verify_batch([{"answer": "0.5"}], ["x = \\\\frac{1}{2}"])
    [True]
    >>> v.verify_batch([{"prompt": "2+3?", "completion": "2+3=5. Answer: 5"}], ["Answer: 5"])  # no answer field
    [True]
"""

from __future__ import annotations

import json

import difflib
import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hpd.errors import HPDError

KINDS = ("exact", "math", "task")
# The bundled tasks end their references with "Answer: <value>": the rest of the line after the
# marker, up to the next marker on that line.
DEFAULT_ANSWER_PATTERN = r"answer\s*[:=]\s*((?:(?!answer\s*[:=]).)+)"
FORMS = "exact, math, task, or MODULE:FUNCTION (a module on sys.path or path/to/file.py, and a function fn(row, completion) -> bool)"


def _short(text: Any, width: int = 40) -> str:
    text = str(text)
    return repr(text if len(text) <= width else text[: width - 3] + "...")


class Verifier:
    """Scores completions of data rows. Subclasses set `name`, `fields` and implement `verify`."""

    name: str = ""
    # What every row must hold, besides its prompt: a field, or a tuple of fields of which one will do.
    fields: tuple[str | tuple[str, ...], ...] = ()

    def check_rows(self, rows: Sequence[Mapping[str, Any]], sources: Sequence[str] | None = None) -> None:
        """Raise `HPDError` naming the first row without a field this verifier reads (before generating).

        sources: where each row comes from (`hpd.apps.evaluate.load_rows`: "train.jsonl:17"), named
        in the message instead of the row's position."""
        for i, row in enumerate(rows):
            for key in self.fields:
                keys = key if isinstance(key, tuple) else (key,)
                if not isinstance(row, Mapping) or all(row.get(k) is None for k in keys):
                    where = sources[i] if sources is not None else (
                        f"row {i} (0-based; prompt {_short(row.get('prompt', '') if isinstance(row, Mapping) else row)})")
                    wanted = " or ".join(f"'{k}'" for k in keys)
                    raise HPDError(f"verifier '{self.name}' reads the field {wanted} of every row, but {where} "
                                   f"has none: add {keys[0]!r} to every row")

    def max_new_tokens(self, row: Mapping[str, Any]) -> int | None:
        """The generation budget this row calls for, or None for the caller's default."""
        return None

    def verify(self, row: Mapping[str, Any], completion: str) -> bool:
        raise NotImplementedError

    def partial_credit(self, row: Mapping[str, Any], completion: str) -> float | None:
        """A graded score in [0, 1] beside the verdict (a task's, e.g. math's steps right), or None."""
        return None

    def verify_batch(self, rows: Sequence[Mapping[str, Any]], completions: Sequence[str]) -> list[bool]:
        """One verdict per row, in input order; a verifier that raises becomes a one-line `HPDError`."""
        if len(rows) != len(completions):
            raise HPDError(f"verifier '{self.name}': {len(rows)} rows but {len(completions)} completions: "
                           "pass one completion per row")
        self.check_rows(rows)
        return [self._call(i, row, lambda r=row, c=c: self.verify(r, c)) for i, (row, c) in enumerate(zip(rows, completions))]

    def _call(self, i: int, row: Mapping[str, Any], fn: Callable[[], Any]) -> bool:
        verdict = self._guard(f"row {i} (0-based; prompt {_short(row.get('prompt', ''))})", fn)
        if type(verdict).__name__ not in ("bool", "bool_") and verdict not in (0, 1):
            raise HPDError(f"verifier '{self.name}' returned {_short(verdict)} for row {i}, not True/False")
        return bool(verdict)

    def _guard(self, where: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except HPDError:
            raise
        except Exception as e:  # a user's (or a task's) checker failing: say where, not a traceback
            detail = str(e).splitlines()[0] if str(e) else ""
            raise HPDError(f"verifier '{self.name}' raised on {where}: {type(e).__name__}{': ' + detail if detail else ''}") from None

    def __repr__(self) -> str:
        return f"<verifier {self.name}>"


class ExactVerifier(Verifier):
    """The extracted final answer equals the row's `answer` (stripped, case-insensitive)."""

    name = "exact"
    fields = (("answer", "completion"),)

    def __init__(self, answer_pattern: str | None = None):
        self.pattern_text = answer_pattern or DEFAULT_ANSWER_PATTERN
        try:
            self.pattern = re.compile(self.pattern_text, re.IGNORECASE)
        except re.error as e:
            raise HPDError(f"--answer-pattern {self.pattern_text!r} is not a regular expression: {e}") from None
        if self.pattern.groups > 1:
            raise HPDError(f"--answer-pattern {self.pattern_text!r} has {self.pattern.groups} groups; give at most one "
                           "group around the answer, e.g. 'Answer: (.+)'")

    def extract(self, completion: str) -> str:
        """The answer: the last (non-overlapping) match of the pattern, its group if it has one, else
        the last non-empty line."""
        found = list(self.pattern.finditer(completion))
        if found:
            return found[-1].group(1 if self.pattern.groups else 0).strip()
        lines = [line.strip() for line in completion.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def verify(self, row, completion):
        reference = row.get("answer")
        reference = self.extract(str(row["completion"])) if reference is None else str(reference)
        return self.extract(completion).casefold() == reference.strip().casefold()


_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_LAST_NUMBER = re.compile(r"-?\d+(?:[.,/]\d+)*")


def reference_answer(completion: str) -> str:
    """The final answer of a reference solution: after its last `Answer:` marker, else its last
    `\\boxed{}`, else its last number, else its last non-empty line.

        >>> reference_answer("3*4=12. 12-2=10. Answer: 10"), reference_answer("so $\\\\boxed{\\\\frac{1}{2}}$")
        ('10', '\\\\frac{1}{2}')
    """
    marker = list(re.finditer(r"answer\s*[:=]", completion, re.IGNORECASE))
    if marker:
        return completion[marker[-1].end():].strip()
    for pattern in (_BOXED, _LAST_NUMBER):
        found = pattern.findall(completion)
        if found:
            return found[-1].strip()
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class MathVerifier(Verifier):
    """The completion's final answer equals the row's `answer` (else its `completion`'s final
    answer, `reference_answer`) mathematically (math-verify)."""

    name = "math"
    fields = (("answer", "completion"),)

    def verify(self, row, completion):
        from hpd.apps.tasks import verify_free_form

        reference = row.get("answer")
        return verify_free_form(completion, reference_answer(str(row["completion"])) if reference is None else str(reference))


class TaskVerifier(Verifier):
    """Rows of bundled tasks (`hpd data`), each checked by its task's verifier.

    With `task` given, every row is checked by that task (what `hpd eval --task` does); otherwise
    each row names its task in the field `task`.
    """

    name = "task"

    def __init__(self, task: Any = None):
        self.task = task
        self.fields = ("meta",) if task is not None else ("task", "meta")
        self._tasks: dict[str, Any] = {}

    def _task_of(self, row: Mapping[str, Any]):
        if self.task is not None:
            return self.task
        from hpd.apps.tasks import data_task, get_task

        name = str(row["task"])
        meta = row.get("meta") if isinstance(row.get("meta"), Mapping) else {}
        if name not in self._tasks:
            # The row is data: it names a task and its problem parameters, never how code runs.
            self._tasks[name] = data_task(name)
        # The task's own parameters recorded in the row (e.g. math's `steps`) set its generation
        # budget: a 20-step chain needs far more tokens than the default 4-step one.
        params = {k: meta[k] for k in self._tasks[name].params if k in meta}
        key = f"{name}:{json.dumps(params, sort_keys=True)}" if params else name
        if key not in self._tasks:
            self._tasks[key] = get_task(name, **params)
        return self._tasks[key]

    def check_rows(self, rows, sources=None):
        super().check_rows(rows, sources)
        used: dict[int, Any] = {}
        for i, row in enumerate(rows):
            where = sources[i] if sources is not None else f"row {i} (0-based)"
            if not isinstance(row["meta"], Mapping):
                raise HPDError(f"verifier 'task': {where} has a 'meta' that is not an object: "
                               "write the file with `hpd data`")
            try:
                task = self._task_of(row)
            except HPDError as e:
                raise HPDError(f"verifier 'task': {where}: {e}") from None
            used[id(task)] = task
        for task in used.values():
            task.preflight()  # e.g. the code task without its sandbox: say so before generating

    def max_new_tokens(self, row):
        return self._task_of(row).max_new_tokens

    def partial_credit(self, row, completion):
        from hpd.apps.tasks import task_item

        return self._task_of(row).partial_credit(task_item(row), completion)

    def verify_batch(self, rows, completions):
        from hpd.apps.tasks import task_item

        if len(rows) != len(completions):
            raise HPDError(f"verifier 'task': {len(rows)} rows but {len(completions)} completions: "
                           "pass one completion per row")
        self.check_rows(rows)
        verdicts: list[bool | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):  # one batch per task (the code task runs its batch in parallel)
            groups.setdefault(id(self._task_of(row)), []).append(i)
        for idx in groups.values():
            task = self._task_of(rows[idx[0]])
            items = [task_item(rows[i]) for i in idx]
            got = self._guard(f"the rows of task '{task.name}'",
                              lambda: task.verify_batch(items, [completions[i] for i in idx]))
            for i, ok in zip(idx, got):
                verdicts[i] = bool(ok)
        return verdicts  # type: ignore[return-value]


class FunctionVerifier(Verifier):
    """A user's function `fn(row: dict, completion: str) -> bool`, named `MODULE:FUNCTION`."""

    def __init__(self, spec: str, fn: Callable[[dict, str], bool]):
        self.name = spec
        self.fn = fn

    def verify(self, row, completion):
        return self.fn(row, completion)


def _load_function(spec: str) -> Callable[[dict, str], bool]:
    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name:
        raise HPDError(f"verifier {spec!r}: write MODULE:FUNCTION or path/to/file.py:FUNCTION")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise HPDError(f"verifier {spec!r}: file {module_name} not found")
        loader_spec = importlib.util.spec_from_file_location(f"hpd_user_verifier_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise HPDError(f"verifier {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise HPDError(f"verifier {spec!r}: cannot import module '{module_name}' ({type(e).__name__}: {e}); "
                           "put it on PYTHONPATH or name its file, e.g. path/to/file.py:FUNCTION") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        names = [n for n in vars(module) if callable(getattr(module, n)) and not n.startswith("_")]
        close = difflib.get_close_matches(fn_name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise HPDError(f"verifier {spec!r}: module '{module_name}' has no function '{fn_name}'{hint}")
    if not callable(fn):
        raise HPDError(f"verifier {spec!r}: '{fn_name}' in '{module_name}' is not a function")
    try:
        inspect.signature(fn).bind({}, "")
    except TypeError:
        raise HPDError(f"verifier {spec!r}: '{fn_name}' must take (row: dict, completion: str)") from None
    except ValueError:
        pass  # a builtin without a signature: call it and see
    return fn


class VerifierReward:
    """A verifier as a reward function for TRL's `GRPOTrainer`: 1.0 for a solved completion, else 0.0.

    TRL calls `reward(prompts=..., completions=..., completion_ids=..., **columns)`, every dataset
    column a list with one value per completion; the row of completion i is `{column: values[i]}`
    (with `prompt`), so the dataset holds what the verifier reads (`answer`, `meta`, ...). A chat
    completion (a list of `{"role", "content"}` messages) is scored on its assistant text.
    `generated_tokens` adds up the lengths of the `completion_ids` scored (TRL's sampled tokens).

        >>> r = VerifierReward(get_verifier("exact"))
        >>> r(prompts=["2+2?", "2+2?"], completions=["Answer: 4", [{"role": "assistant", "content": "Answer: 5"}]],
        ...   completion_ids=[[1, 2, 3], [4, 5]], answer=["4", "4"])
        [1.0, 0.0]
        >>> r.generated_tokens
        5
    """

    def __init__(self, verifier: Verifier):
        self.verifier = verifier
        self.__name__ = f"verifier_{verifier.name or 'function'}"  # TRL names the logged reward by it
        self.generated_tokens = 0

    @staticmethod
    def text_of(completion: Any) -> str:
        """The text of a plain completion, or of the assistant messages of a chat completion."""
        if isinstance(completion, str):
            return completion
        if isinstance(completion, Sequence) and all(isinstance(m, Mapping) for m in completion):
            said = [m for m in completion if m.get("role", "assistant") == "assistant"]
            return "".join(str(m.get("content") or "") for m in said)
        raise HPDError(f"reward: a completion must be a string or a list of chat messages, not {type(completion).__name__}")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
                 **columns: Any) -> list[float]:
        n = len(completions)
        rows = []
        for i in range(n):
            row = {k: v[i] for k, v in columns.items() if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == n}
            row.setdefault("prompt", prompts[i] if isinstance(prompts[i], str) else self.text_of(prompts[i]))
            rows.append(row)
        verdicts = self.verifier.verify_batch(rows, [self.text_of(c) for c in completions])
        if completion_ids is not None:
            self.generated_tokens += sum(len(ids) for ids in completion_ids)
        return [1.0 if ok else 0.0 for ok in verdicts]


def get_verifier(spec: str, *, answer_pattern: str | None = None) -> Verifier:
    """The verifier `spec` names: `exact`, `math`, `task`, or `MODULE:FUNCTION`.

    `answer_pattern` (a regular expression, its one group around the answer) is for `exact` only.
    """
    spec = spec.strip()
    if answer_pattern is not None and spec != "exact":
        raise HPDError(f"--answer-pattern applies to the exact verifier only, not to {spec!r}")
    if spec == "exact":
        return ExactVerifier(answer_pattern)
    if spec == "math":
        return MathVerifier()
    if spec == "task":
        return TaskVerifier()
    if ":" in spec:
        return FunctionVerifier(spec, _load_function(spec))
    close = difflib.get_close_matches(spec, KINDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise HPDError(f"unknown verifier {spec!r}{hint}; use {FORMS}")


__all__ = ["DEFAULT_ANSWER_PATTERN", "KINDS", "ExactVerifier", "FunctionVerifier", "MathVerifier", "TaskVerifier",
           "Verifier", "VerifierReward", "get_verifier", "reference_answer"]
