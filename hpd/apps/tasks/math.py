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

import random
import re
import threading
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


def extract_answer(completion: str) -> str | None:
    """The number after the last "Answer:" marker, or None when there is none."""
    found = _ANSWER_RE.findall(completion)
    return found[-1] if found else None


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def verify_free_form(completion: str, reference_answer: str) -> bool:
    """Whether a free-form math answer equals the reference (e.g. "1/2" vs "0.5", LaTeX, boxed).

    Uses `math_verify` (`pip install math-verify`) when installed; otherwise compares the last
    number in the completion with the reference numerically. A "Answer:" marker, when present,
    narrows the completion to what follows it, so numbers in a chain of thought do not count.
    """
    marker = list(re.finditer(r"answer\s*[:=]", completion, re.IGNORECASE))
    if marker:
        completion = completion[marker[-1].end():]
    try:
        from math_verify import parse, verify
    except ImportError:
        return _numeric_equal(completion, reference_answer)
    # math_verify times out with SIGALRM, which only the main thread may set.
    timeout: int | None = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(reference_answer, parsing_timeout=timeout)
    pred = parse(completion, parsing_timeout=timeout)
    if not gold or not pred:
        return _numeric_equal(completion, reference_answer)
    return bool(verify(gold, pred, timeout_seconds=timeout))


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
