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

A second table (with the OS sandbox only) splits the cost by layer: one fork server runs
`--layer-jobs` trivial jobs plain, with the per-child seccomp filter, inside bubblewrap, and with
both, in rotation; it gives the median CPU milliseconds per job the server reported. Its last
row runs both with the child filter before issue 35 (thread clones allowed).

A third table prices the thread bound of issue 35 (the child may not clone at all) against the
filter before it (thread clones allowed): the `correct` batch verified with each child filter in
turn, `--rounds` times each, alternating; completions/s and CPU ms per completion (medians).

    OMP_NUM_THREADS=1 python benchmarks/code_sandbox.py --n 200 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from hpd.apps.tasks.code import CodeTask

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


def _layers(jobs_n: int, rounds: int) -> None:
    import json
    import subprocess

    from hpd.apps.tasks import sandbox as sb

    found = sb.isolation()
    jobs = [{"src": "x*2+1", "var": "x", "inputs": list(range(8))}] * jobs_n

    def cpu_ms_per_job(child_filter: bool, boxed: bool) -> float:
        payload = json.dumps({"jobs": jobs, "timeout": 2, "memory": 256 << 20, "cpu": 2,
                              "result_limit": sb.RESULT_LIMIT, "max_depth": sb.RESULT_DEPTH,
                              "filter": (child_filter if isinstance(child_filter, bytes) else found.child_filter).hex()
                              if child_filter else None}).encode()
        args, fds = ["-I", "-S", "-B", "-c", sb._SERVER], ()
        if boxed:
            r, w = os.pipe()
            os.write(w, found.sandbox_filter)
            os.close(w)
            command, fds = found.command(args, r), (r,)
        else:
            command = [sb._interpreter(), *args]
        out = subprocess.run(command, input=payload, capture_output=True, pass_fds=fds, check=True)
        for fd in fds:
            os.close(fd)
        return json.loads(out.stdout.splitlines()[-1])["cpu_s"] / jobs_n * 1e3

    old_filter = sb._compile_filters(child_threads=True)[1]
    variants = {"plain fork server": (False, False), "+ child seccomp filter": (True, False),
                "in bubblewrap (+ its filter)": (False, True), "both (what verify runs)": (True, True),
                "both, child filter allowing threads (before issue 35)": (old_filter, True)}
    got: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (child_filter, boxed) in variants.items():
            got[name].append(cpu_ms_per_job(child_filter, boxed))
    print(f"\nper layer: {jobs_n} trivial jobs (8 inputs each) in one fork server, median of {rounds}\n")
    print("| server | CPU ms per job |")
    print("|---|---:|")
    for name, values in got.items():
        print(f"| {name} | {statistics.median(values):.2f} |")


def _thread_bound(task: CodeTask, items: list, rounds: int) -> None:
    """The `correct` batch with the child filter of today (no clone) and of before (threads allowed)."""
    import dataclasses

    from hpd.apps.tasks import sandbox as sb

    now = sb.isolation()
    before = dataclasses.replace(now, child_filter=sb._compile_filters(child_threads=True)[1])
    completions = [it.reference for it in items]
    got: dict[str, list[tuple[float, float, int]]] = {"threads allowed (before issue 35)": [], "no clone at all (now)": []}
    try:
        for _ in range(rounds):
            for name, found in zip(got, (before, now)):
                sb._found = found  # the isolation every later batch of this process uses
                got[name].append(_measure(task, items, completions, 1))
    finally:
        sb._found = now
    print(f"\nthe thread bound: {len(items)} correct completions, each child filter {rounds} times, alternating\n")
    print("| child filter | completions/s | CPU ms per completion | scored True |")
    print("|---|---:|---:|---:|")
    for name, runs in got.items():
        wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"| {name} | {len(items) / wall:.0f} | {cpu / len(items) * 1e3:.2f} | {runs[-1][2]}/{len(items)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="completions per batch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layer-jobs", type=int, default=300, help="jobs per run of the per-layer table (0 = skip)")
    ap.add_argument("--no-bound", dest="bound", action="store_false", help="skip the thread-bound table")
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
    if args.layer_jobs and hasattr(task, "sandbox_mode"):
        _layers(args.layer_jobs, args.rounds)
    if args.bound and hasattr(task, "sandbox_mode"):
        _thread_bound(task, items, args.rounds)


if __name__ == "__main__":
    main()
