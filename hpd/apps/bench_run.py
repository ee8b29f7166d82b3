"""`hpd bench` from its settings to its report: plan every condition's runs (`hpd.apps.bench`), run
or reuse them, and write the tables (`hpd.apps.bench_report`). Above both, so that the report
module, which reads the bench's plans, is never imported back by them.

    >>> from hpd.apps.bench_run import run_bench
    >>> run_bench.__name__
    'run_bench'
"""

from __future__ import annotations

import time
from pathlib import Path

from hpd.apps.bench import (
    METHODS, REFERENCE, BenchSettings, build_conditions, manifest_settings, plan_grid, plan_rates, plan_tuned,
    restore_archived, reuse, run_all,
)
from hpd.apps.bench_manifest import check_manifest, exclusive
from hpd.apps.bench_report import write_report
from hpd.apps.recipe import preflight_tasks
from hpd.errors import HPDError


def run_bench(s: BenchSettings) -> Path:
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise HPDError(f"unknown bench method(s) {unknown}; choose from: {', '.join(METHODS)}")
    if 1.0 not in s.lr_grid:
        raise HPDError(f"--lr-grid {s.lr_grid} must contain 1 (the base rate, which the equal-lr table uses)")
    if REFERENCE not in s.methods:
        raise HPDError(f"the bench compares every method with {REFERENCE!r}: include it in --methods")
    if not (Path(s.teacher) / "config.json").is_file():
        raise HPDError(f"no teacher at {s.teacher}: pass --teacher DIR or run `bash scripts/build_teacher.sh`")
    if s.verifier is not None:
        from hpd.apps.verifiers import get_verifier

        get_verifier(s.verifier, answer_pattern=s.answer_pattern)  # a bad spec fails before any training
    else:
        preflight_tasks()  # e.g. no sandbox for generated code: say so before training
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if s.report_only:
        return _bench(s, out)
    with exclusive(out):
        return _bench(s, out)


def _bench(s: BenchSettings, out: Path) -> Path:
    settings = manifest_settings(s)
    check_manifest(out, settings)  # before any data file under OUT is reused
    if s.archive is not None:  # nor any run restored from the archive
        check_manifest(Path(s.archive), settings, flag="--archive")
    conditions, missing = build_conditions(s)
    for line in missing:
        print(f"[bench] not run: {line}", flush=True)
    t0 = time.perf_counter()
    for cond in conditions if s.report_only else []:
        grid = plan_grid(cond, s)
        restore_archived(grid, s)  # the tuned rates are read from the grid's (restored) scores
        reuse(grid + plan_tuned(cond, s), s)
    for cond in [] if s.report_only else conditions:
        print(f"[bench] condition {cond.name}: {cond.note}; {len(s.methods)} methods, grid {s.lr_grid} x base lr "
              f"{cond.start.lr:g}, seeds {s.seeds}, {cond.start.steps} steps", flush=True)
    # Every condition's seed-0 grid first: the validation picks are the first thing an interrupted
    # bench should know (each method's rate, and whether the grid's edge was picked).
    for cond in [] if s.report_only else conditions:
        print(f"[bench] {cond.name}: seed {s.seeds[0]} at every rate of the grid", flush=True)
        run_all(plan_rates(cond, s), s, cond.verifier)
    if not s.report_only and len(conditions) > 1:
        write_report(s, conditions, missing)
    for cond in [] if s.report_only else conditions:
        print(f"[bench] {cond.name}: the other seeds", flush=True)
        run_all(plan_grid(cond, s), s, cond.verifier)
        run_all(plan_tuned(cond, s), s, cond.verifier)
        if cond is not conditions[-1]:  # the tables so far; the last condition's are written below
            write_report(s, conditions, missing)
    path = write_report(s, conditions, missing)
    print(path.read_text())
    print(f"[bench] done in {time.perf_counter() - t0:.0f} s: {path}")
    return out
