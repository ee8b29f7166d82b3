"""The `code` task: write a one-line Python function body from a short description.

A prompt such as `"Write f(x): double, then add 3."` asks for the body of `lambda x: ...`; the
reference is `"x*2+3"`. Problems come from a small grammar: integer `x` (arithmetic, abs, mod,
floor division), string `s` (reverse, upper, slices, repeat, length) and list `xs` (sort, filter,
map, sum/max/len). A completion may also be a whole `lambda x: ...` or `def f(x): return ...`.

The verifier runs each completion on hidden inputs in a process of its own, forked from a small
`python -I -S` server started with an empty environment: a wall-clock limit (`timeout_s`,
default 2 s), a CPU limit, an address-space limit (`memory_mb`, default 256), no file writes,
sockets replaced by a function that raises, and an audit hook that refuses network, subprocesses,
signals and file changes. The child sends back the function's outputs and the parent compares
them with the expected ones, which the child never sees. A crash, exception, endless loop, memory
bomb or early exit scores False and never stops the evaluation or touches another completion's
score. This guards against the mistakes and tricks of small models; it is not a security
boundary for hostile code.

    >>> from hpd.tasks.code import CodeTask
    >>> task = CodeTask()
    >>> item = task.generate("test", 1, seed=0)[0]
    >>> item.prompt, item.reference  # doctest: +SKIP
    ('Write f(x): add 3, then double.', '(x+3)*2')
    >>> task.verify_batch([item, item], [item.reference, "x"])
    [True, False]
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hpd.errors import HPDError
from hpd.tasks.base import Task, TaskItem

KINDS: tuple[str, ...] = ("int", "str", "list")
# Operator precedence levels used to parenthesize only where Python needs it.
ADD, MUL, NEG, POW, ATOM = 0, 1, 2, 3, 4
RESULT_LIMIT = 1 << 16  # bytes of results a child may send back before it is killed

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cat", "moon", "table", "green", "house", "light", "bird",
    "cloud", "tree", "water", "music", "road", "paper", "sun", "chair", "dog", "fish",
)

# The sandbox. A small "fork server" process reads {"jobs": [{"src", "var", "inputs"}], "timeout"}
# on stdin and, for each job, forks a fresh child that installs the guards, runs the completion
# on the inputs and sends back [["ok", value] | ["err", exception name]] per input. The server
# kills a child that overruns the wall-clock limit or sends too much, and prints one JSON line per
# job (null for a failed child). Forking from this small process costs about a millisecond,
# against some 25 ms for a fresh interpreter, and every completion still gets its own process:
# nothing one does (patching builtins, exhausting memory, exiting) reaches another.
_SERVER = r"""
import sys, os, json, resource, select, signal, time, socket, _socket
def _limit(res, value):
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):
        pass
_limit(resource.RLIMIT_AS, MEMORY_BYTES)
_limit(resource.RLIMIT_CORE, 0)
payload = json.loads(sys.stdin.read())
TIMEOUT = float(payload["timeout"])

def _guard():

    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled in the code verifier")
    socket.socket = _socket.socket = socket.create_connection = _no_network
    socket.socketpair = socket.getaddrinfo = _no_network
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.remove", "os.unlink",
               "os.rmdir", "os.rename", "os.replace", "os.truncate", "os.chmod", "os.chown",
               "os.link", "os.symlink", "os.mkdir", "os.putenv", "os.unsetenv", "os.utime",
               "os.chdir", "os.setxattr", "os.removexattr", "shutil.", "ctypes.", "pty.",
               "urllib.", "http.", "ftplib.", "smtplib.", "webbrowser.", "sys.setrecursionlimit")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def audit(event, args):
        if event.startswith(blocked):
            raise RuntimeError(event + " is not allowed in the code verifier")
        if event == "open":
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            ):
                raise RuntimeError("writing files is not allowed in the code verifier")
    sys.addaudithook(audit)  # audit hooks cannot be removed once added

def _compile(src, var):
    src = src.strip()
    if src.startswith("def "):
        scope = {}
        exec(compile(src, "<completion>", "exec"), scope)
        return scope.get("f")
    if src.startswith("lambda"):
        return eval(compile(src, "<completion>", "eval"), {})
    return eval(compile("lambda " + var + ": (" + src + "\n)", "<completion>", "eval"), {})

def _child(job, fd):
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):  # what the completion prints goes nowhere
        os.dup2(null, std)
    _limit(resource.RLIMIT_CPU, CPU_SECONDS)
    _limit(resource.RLIMIT_FSIZE, 0)
    dumps, write = json.dumps, os.write
    _guard()
    results = []
    try:
        fn = _compile(job["src"], job["var"])
        if not callable(fn):
            raise TypeError("the completion is not a function")
    except BaseException as e:
        fn, failure = None, ["err", type(e).__name__]
    for value in job["inputs"]:
        if fn is None:
            results.append(failure)
            continue
        try:
            out = fn(value)
            dumps(out)  # only plain JSON data can be compared with the expected outputs
            results.append(["ok", out])
        except BaseException as e:
            results.append(["err", type(e).__name__])
    data = dumps(results).encode()
    if len(data) > RESULT_LIMIT:
        data = b"null"
    while data:
        data = data[write(fd, data):]

def _run(job):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(job, w)
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + TIMEOUT
    chunks, size, ok = [], 0, True
    while True:  # read until EOF, the deadline or the size limit
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            ok = False
            break
        data = os.read(r, 1 << 16)
        if not data:
            break
        chunks.append(data)
        size += len(data)
        if size > RESULT_LIMIT:
            ok = False
            break
    os.close(r)
    status = None
    while ok and status is None:  # EOF came; the child must also exit, cleanly and in time
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = code
        elif time.monotonic() > deadline:
            ok = False
        else:
            time.sleep(0.0005)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None
    if status != 0:
        return None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return None

for job in payload["jobs"]:
    sys.stdout.write(json.dumps(_run(job)) + "\n")
    sys.stdout.flush()
"""


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
        timed out or sent no result. Jobs are spread over `workers` fork servers.
        """
        if not jobs:
            return []
        chunks = [list(range(w, len(jobs), self.workers)) for w in range(self.workers)]
        chunks = [c for c in chunks if c]
        results: list[list[Any] | None] = [None] * len(jobs)
        with tempfile.TemporaryDirectory(prefix="hpd-code-") as workdir:

            def work(chunk: list[int]) -> None:
                out = self._serve([jobs[i] for i in chunk], workdir)
                for i, r in zip(chunk, out):
                    results[i] = r
                # A server that died early (it should not) leaves jobs unanswered: give each of
                # those a server of its own, so one job cannot take the others down with it.
                for i in chunk[len(out):]:
                    again = self._serve([jobs[i]], workdir)
                    results[i] = again[0] if again else None

            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                list(pool.map(work, chunks))
        return results

    def _serve(self, jobs: list[dict[str, Any]], workdir: str) -> list[list[Any] | None]:
        """Run jobs in one fork-server process; returns the answers it gave (maybe fewer)."""
        code = (
            _SERVER.replace("MEMORY_BYTES", str(self.memory_mb << 20))
            .replace("CPU_SECONDS", str(max(1, math.ceil(self.timeout_s))))
            .replace("RESULT_LIMIT", str(RESULT_LIMIT))
        )
        payload = json.dumps({"jobs": jobs, "timeout": self.timeout_s}).encode()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={},
                cwd=workdir,
                start_new_session=True,  # its own process group, killed as a whole
            )
        except OSError:
            return []
        try:
            stdout, _ = proc.communicate(payload, timeout=len(jobs) * (self.timeout_s + 1) + 10)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            stdout = b""
        finally:
            self._kill(proc)
        answers: list[list[Any] | None] = []
        for line in stdout.decode("utf-8", "replace").splitlines():
            try:
                answer = json.loads(line)
            except ValueError:
                break
            answers.append(answer if isinstance(answer, list) else None)
        return answers[: len(jobs)]

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """Kill the server's whole process group while it runs, then reap it.

        Only a group whose leader has not been reaped is signalled, so the id cannot have been
        reused by an unrelated process.
        """
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
