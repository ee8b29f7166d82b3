"""The `math` task: multi-step arithmetic with a written chain of thought and a marked answer.

A prompt lists a start value and `steps` operations; the reference writes every intermediate
result, then the answer after "Answer:". Every value stays an integer in 0..`max_value` (default
99): subtraction never goes below zero, division is exact, multiplication stays in range, so a
tiny byte-level model can learn the format and get some problems right. The verifier reads only
the marked final answer, so any correct chain (or none) passes.

    >>> from hpd.apps.tasks.math import MathTask, verify_free_form
    >>> item = MathTask(steps=3).generate("train", 1, seed=0)[0]
    >>> item.prompt, item.reference  # doctest: +SKIP
    ('Start at 7, add 5, times 2, minus 3.', '7+5=12. 12*2=24. 24-3=21. Answer: 21')
    >>> MathTask().verify(item, "I think... Answer: " + item.answer)
    True
    >>> verify_free_form("so x = \\\\frac{1}{2}", "0.5")
    True
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import select
import subprocess
import sys
import threading
import time
import warnings
from fractions import Fraction
from typing import Any

from hpd.errors import HPDError
from hpd.apps.tasks.base import Task, TaskItem

# Operand ranges: single digits keep the arithmetic within what a tiny model can learn.
MUL_RANGE = range(2, 6)
START_RANGE = range(1, 21)
MAX_STEPS = 32  # long chains (16-32 steps) make answers of a few hundred tokens

_STEP_RE = re.compile(r"(-?\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)")
_ANSWER_RE = re.compile(r"answer\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
# How long math-verify may take over one answer, and to start (Python and sympy, once).
VERIFY_TIMEOUT_S = 2.0
STARTUP_TIMEOUT_S = 60.0


def extract_answer(completion: str) -> str | None:
    """The number after the last "Answer:" marker, or None when there is none."""
    found = _ANSWER_RE.findall(completion)
    return found[-1] if found else None


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def verify_free_form(completion: str, reference_answer: str, timeout_s: float = VERIFY_TIMEOUT_S) -> bool:
    """Whether a free-form math answer equals the reference (e.g. "1/2" vs "0.5", LaTeX, boxed).

    Uses `math_verify` (`pip install math-verify`) when installed, in a helper process with a
    deadline of `timeout_s` seconds (`MathChecker`): an answer that takes longer (`9^9^9^9`) is
    scored wrong, with a one-line warning, from any thread. Without math-verify, compares the last
    number in the completion with the reference numerically. A "Answer:" marker, when present,
    narrows the completion to what follows it, so numbers in a chain of thought do not count.
    """
    marker = list(re.finditer(r"answer\s*[:=]", completion, re.IGNORECASE))
    if marker:
        completion = completion[marker[-1].end():]
    if not _have_math_verify():
        return _numeric_equal(completion, reference_answer)
    verdict = _checker.check(completion, reference_answer, timeout_s)
    if verdict is None:  # math-verify could not read one of them: compare the numbers
        return _numeric_equal(completion, reference_answer)
    return verdict


def _have_math_verify() -> bool:
    if "math_verify" in sys.modules:  # None there: made unimportable (as a test does)
        return sys.modules["math_verify"] is not None
    return importlib.util.find_spec("math_verify") is not None


# The helper process: reads [completion, reference] lines, writes true, false, or null (not
# parsed). math-verify's own SIGALRM timeouts work here (its main thread) for slow Python; a
# CPU limit reset before each request ends it if it overruns in C with its parent gone.
_CHECKER = r"""
import json, math, resource, sys
from math_verify import parse, verify
budget = int(sys.argv[1])
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    completion, reference = json.loads(line)
    used = resource.getrusage(resource.RUSAGE_SELF)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used.ru_utime + used.ru_stime) + budget + 1,
                                             resource.RLIM_INFINITY))
    try:
        gold = parse(reference, parsing_timeout=budget)
        pred = parse(completion, parsing_timeout=budget)
        verdict = bool(verify(gold, pred, timeout_seconds=budget)) if gold and pred else None
    except Exception:
        verdict = False
    sys.stdout.write(json.dumps(verdict) + "\n")
    sys.stdout.flush()
"""


class MathChecker:
    """math-verify in a helper process of its own, so that every check has a deadline.

    math-verify bounds its work with SIGALRM, which only a main thread may set, and which cannot
    stop a big-integer power computed in C (holding the GIL, it stalls every thread): `Answer:
    9^9^9^9` took 5.5 s in the main thread and did not end in minutes in another. Here the
    process gets one request at a time; one that runs past `timeout_s` is killed (the check is
    False) and the next check starts a new one (about a second: Python and sympy). Its data is
    two strings, parsed by math-verify's LaTeX and number grammars (no `eval` of the text), so it
    runs without a sandbox; its memory is bounded by the deadline.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self.timeouts = 0
        self._warned = False

    def check(self, completion: str, reference: str, timeout_s: float) -> bool | None:
        """True/False, None when math-verify parses nothing; False (and a warning) past the deadline."""
        with self._lock:
            proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start(timeout_s)
            line = json.dumps([completion, reference]) + "\n"
            try:
                proc.stdin.write(line.encode())
                proc.stdin.flush()
                answer = self._read_line(proc, time.monotonic() + timeout_s)
            except OSError:  # it died (e.g. out of memory): the check failed
                answer = None
            if answer is not None:
                return json.loads(answer)
            self._stop()
            self.timeouts += 1
        if not self._warned:
            self._warned = True
            warnings.warn(f"math: checking an answer took over {timeout_s:g} s (e.g. a power tower such as "
                          f"9^9^9^9): scored wrong", RuntimeWarning, stacklevel=3)
        return False

    def _start(self, timeout_s: float) -> subprocess.Popen:
        self._stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHECKER, str(max(1, math.ceil(timeout_s)))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        if self._read_line(self._proc, time.monotonic() + STARTUP_TIMEOUT_S) != b"ready":
            self._stop()
            raise HPDError(f"math: the math-verify checker did not start in {STARTUP_TIMEOUT_S:g} s: check that "
                           f"`{sys.executable} -c 'import math_verify'` works")
        return self._proc

    def _read_line(self, proc: subprocess.Popen, deadline: float) -> bytes | None:
        """The next line from the helper, or None when it does not come by `deadline`."""
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 1 << 16)
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
        self._proc, self._buffer = None, b""


_checker = MathChecker()
# A forked process (a bench worker) starts its own helper: sharing the parent's pipes would mix
# their answers, and the lock may have been held by a thread that the fork left behind.
os.register_at_fork(after_in_child=lambda: _checker.__init__())


def _numeric_equal(completion: str, reference_answer: str) -> bool:
    numbers = _NUMBER_RE.findall(completion)
    ref = _as_number(reference_answer)
    if not numbers or ref is None:
        return False
    got = _as_number(numbers[-1])
    return got is not None and got == ref


class MathTask(Task):
    """Arithmetic chains; `steps` (number of operations) sets the difficulty.

    The default (4 steps, values up to 999, add/minus operands up to 20) is hard enough that the
    bundled teacher stays clearly imperfect on it: multi-digit carries over a long chain.
    """

    name = "math"

    def __init__(self, steps: int = 4, max_value: int = 999, max_operand: int = 20) -> None:
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise HPDError(f"math: steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        if not isinstance(max_value, int) or max_value < 20:
            raise HPDError(f"math: max_value must be an integer >= 20, got {max_value!r}")
        if not isinstance(max_operand, int) or not 9 <= max_operand <= max_value:
            raise HPDError(f"math: max_operand must be an integer in 9..max_value, got {max_operand!r}")
        self.steps = steps
        self.max_value = max_value
        self.add_range = range(1, max_operand + 1)
        # "12*2=24. " is about 9 bytes per step, "Answer: 21" about 10; generous slack.
        self.max_new_tokens = 16 * steps + 24

    @property
    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "max_value": self.max_value, "max_operand": len(self.add_range)}

    def _moves(self, v: int) -> list[tuple[str, str, int, int]]:
        """Every legal (words, symbol, operand, result) from value v, all results in range."""
        moves = []
        for k in self.add_range:
            if v + k <= self.max_value:
                moves.append((f"add {k}", "+", k, v + k))
            if v - k >= 0:
                moves.append((f"minus {k}", "-", k, v - k))
        for k in MUL_RANGE:
            if 1 <= v and v * k <= self.max_value:
                moves.append((f"times {k}", "*", k, v * k))
            if v >= k and v % k == 0:
                moves.append((f"divide by {k}", "/", k, v // k))
        return moves

    def sample(self, rng: random.Random) -> TaskItem:
        v = rng.choice(START_RANGE)
        words, chain = [f"Start at {v}"], []
        for _ in range(self.steps):
            moves = self._moves(v)
            # Pick the kind of operation first, then an operand: otherwise the many add/minus
            # operands would crowd out times/divide.
            kinds = sorted({m[1] for m in moves})
            kind = rng.choice(kinds)
            text, sym, k, nv = rng.choice([m for m in moves if m[1] == kind])
            words.append(text)
            chain.append(f"{v}{sym}{k}={nv}.")
            v = nv
        prompt = ", ".join(words) + "."
        reference = " ".join(chain) + f" Answer: {v}"
        return TaskItem(prompt, reference, str(v), {"task": self.name, "steps": self.steps})

    def partial_credit(self, item: TaskItem, completion: str) -> float | None:
        """The share of the reference's steps the completion performs right, each on its own terms.

        Step i of the completion (its i-th `a op k = r`) is right when it applies the prompt's i-th
        operation (the reference's `op` and `k`) to the completion's own running value (`a` is its
        previous result, or the start value) and computes `r` exactly. An early slip therefore
        costs only its own step: this measures how well each step is done in the student's own
        context, the situation exposure bias is about, rather than whether the chain survives.

            >>> item = MathTask(steps=3).sample(random.Random(0))
            >>> item.reference
            '13+2=15. 15-9=6. 6/3=2. Answer: 2'
            >>> MathTask(steps=3).partial_credit(item, "13+2=15. 15-9=6. 6/3=3. Answer: 3")  # step 3 wrong
            0.6666666666666666
            >>> MathTask(steps=3).partial_credit(item, "13+2=16. 16-9=7. Answer: 7")  # step 1 wrong, 2 right on 16
            0.3333333333333333
        """
        ref = _STEP_RE.findall(item.reference)
        if not ref:
            return None
        value = int(ref[0][0])  # the start
        right = 0
        for (_, op, k, _), (a, got_op, got_k, r) in zip(ref, _STEP_RE.findall(completion)):
            a, kk, r = int(a), int(got_k), int(r)
            exact = {"+": a + kk, "-": a - kk, "*": a * kk,
                     "/": a // kk if kk and a % kk == 0 else None}[got_op]
            right += (got_op, got_k) == (op, k) and a == value and exact == r
            value = r
        return right / len(ref)

    def verify(self, item: TaskItem, completion: str) -> bool:
        got = extract_answer(completion)
        if got is None:
            return False
        a, b = _as_number(got), _as_number(item.answer)
        return a is not None and a == b
