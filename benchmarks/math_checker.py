"""Cost of the math verifier's helper process: per answer, at start, and on an answer that overruns.

`verify_free_form` runs math-verify in a helper process with a deadline (`MathChecker`), so that
an answer such as `9^9^9^9` is scored wrong within `timeout_s` from any thread. This prints, for
the code on PYTHONPATH (run it against an older checkout to compare): the first call (the helper
starting, or the import of math-verify), the mean time per answer over `--n` ordinary answers,
the time on `Answer: 9^9^9^9`, and the next check (a new helper).

    OMP_NUM_THREADS=1 python benchmarks/math_checker.py --n 200
"""

from __future__ import annotations

import argparse
import time
import warnings

from hpd.apps.tasks.math import verify_free_form

CASES = [("so x = \\frac{1}{2}", "0.5"), ("Answer: 21", "21"), ("The result is $\\boxed{21}$.", "21"), ("Answer: 22", "21")]


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="ordinary answers to time")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cases = [CASES[i % len(CASES)] for i in range(args.n)]
    _, first = _timed(lambda: verify_free_form("Answer: 3", "3"))
    verdicts, total = _timed(lambda: [verify_free_form(c, r) for c, r in cases])
    bomb, bomb_s = _timed(lambda: verify_free_form("Answer: 9^9^9^9", "3"))
    after, after_s = _timed(lambda: verify_free_form("Answer: 3", "3"))
    print("| first call s | ms per answer | right | 9^9^9^9 verdict | its s | next check s |")
    print("|---:|---:|---:|---|---:|---:|")
    print(f"| {first:.2f} | {total / args.n * 1e3:.2f} | {sum(verdicts)}/{args.n} | {bomb} | {bomb_s:.2f} | {after_s:.2f} |")
    assert after is True


if __name__ == "__main__":
    main()
