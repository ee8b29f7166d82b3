"""Code-task verification throughput: completions per second, wall and CPU seconds.

Verifies two batches with `CodeTask().verify_batch` (default settings: `timeout_s=2`,
`memory_mb=256`, one fork server per CPU):

- `correct`: N held-out items, each with its reference as the completion;
- `mixed`: the same N items with completions cycling through correct, wrong answers, an
  exception, a syntax error, a memory bomb, a fork, reading /etc/passwd and an `os.execv`
  (none of them hangs, so the figure is throughput, not the 2 s time limit).

Each batch is verified `--rounds` times; the table gives the median round: completions/s, wall
seconds, and CPU seconds of this process plus its children (the fork servers and, when
sandboxed, bubblewrap). The script uses only the API that the task had before the OS sandbox, so
it also measures older code: `PYTHONPATH=/path/to/old/checkout python benchmarks/code_sandbox.py`.

    OMP_NUM_THREADS=1 python benchmarks/code_sandbox.py --n 200 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from hpd.tasks.code import CodeTask

BAD = [
    "x+1 if isinstance(x, int) else x",  # wrong
    "1/0",
    "x +* 2",
    "'x'*10**10",
    "__import__('os').fork()",
    "open('/etc/passwd').read()",
    "__import__('os').execv('/bin/true', ['true'])",
]


def _cpu(task: CodeTask) -> float:
    """CPU seconds of this process, its reaped children, and what the fork servers reported.

    The servers' own figure is needed under bubblewrap, whose processes do not pass their
    children's times on; before the OS sandbox the servers were plain children.
    """
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    reported = getattr(getattr(task, "sandbox", None), "cpu_s", 0.0)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + reported


def _measure(task: CodeTask, items: list, completions: list[str], rounds: int) -> tuple[float, float, int]:
    """(median wall s, median CPU s, number scored True) over `rounds` verifications."""
    walls, cpus, correct = [], [], 0
    for _ in range(rounds):
        wall0, cpu0 = time.perf_counter(), _cpu(task)
        verdicts = task.verify_batch(items, completions)
        walls.append(time.perf_counter() - wall0)
        cpus.append(_cpu(task) - cpu0)
        correct = sum(verdicts)
    return statistics.median(walls), statistics.median(cpus), correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="completions per batch")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    task = CodeTask()
    items = task.generate("test", args.n, seed=0)
    mixed = [
        it.reference if i % (len(BAD) + 1) == 0 else BAD[i % (len(BAD) + 1) - 1]
        for i, it in enumerate(items)
    ]
    task.verify_batch(items[:4], [it.reference for it in items[:4]])  # warm-up (sandbox probe)
    mode = getattr(task, "sandbox_mode", "python guards (before the OS sandbox)")
    print(f"code task verification: {args.n} completions per batch, {task.workers} fork servers, "
          f"median of {args.rounds} rounds; sandbox: {mode}; {os.cpu_count()} CPUs\n")
    print("| batch | completions/s | wall s | CPU s | scored True |")
    print("|---|---:|---:|---:|---:|")
    for name, completions in (("correct", [it.reference for it in items]), ("mixed", mixed)):
        wall, cpu, correct = _measure(task, items, completions, args.rounds)
        print(f"| {name} | {args.n / wall:.0f} | {wall:.3f} | {cpu:.3f} | {correct}/{args.n} |")


if __name__ == "__main__":
    main()
