"""`hpd demo` (`make demo`): HPD against the strongest baseline, in the paper's setting.

The paper distills into a *pretrained* student of the teacher's family. The demo does the same:

1. loads the bundled teacher (`hpd/assets/teacher`, a 1.9M-parameter byte-level Llama trained by
   `scripts/build_teacher.sh` on the three verifiable tasks) and the pretrained student
   (`hpd/assets/students/llama-2x96`, 0.27M parameters, already doing the tasks partly; built by
   `scripts/build_students.sh`);
2. writes training problems with reference solutions and held-out problems;
3. distills the student with `hpd` and with the strongest baseline of the tuned benchmark table
   (`DEMO_BASELINE`), each at its tuned learning rate, on two seeds, runs side by side;
4. scores the teacher, the initial student and every student on the same held-out problems (greedy
   decoding, real verifiers), prints the table and the paired difference (baseline minus HPD) with
   its 95% bootstrap interval, and writes `OUT/results.md`, plots in `OUT/plots/`, the students
   under `OUT/runs/`.

    hpd demo                        # runs/demo, about 5 minutes on 2 CPU cores
    hpd demo --steps 20 --n 20      # a quick look

Runs already finished in OUT are reused, so a second `hpd demo` only prints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hpd.errors import HPDError
from hpd.apps.recipe import (  # noqa: F401 (the demo's recipe, also hpd bench's: imported from here too)
    BUNDLED_TEACHER, STUDENT_OVERRIDES, TASKS, preflight_tasks, student_config, write_task_data,
)
from hpd.files import atomic_write_text

if TYPE_CHECKING:  # only for the annotation: hpd.apps.bench imports this module
    from hpd.apps.bench import BenchSettings


# The demo distills the pretrained student with HPD and with the strongest baseline of the tuned
# benchmark table (benchmarks/RESULTS.md, start `pretrained`, data `gold`), each at its tuned rate.
DEMO_BASELINE = "sft"
DEMO_RATES = {"hpd": 1e-3, "sft": 1e-3}
# Where the demo's closing line sends the reader: the one table of where HPD's claims hold in this
# project's measurements (tiny and real weights, short and many epochs). tests/test_demo.py checks
# that the heading exists.
READINGS = "benchmarks/RESULTS.md#where-hpds-claims-hold-and-where-they-do-not"


@dataclass
class DemoSettings:
    out_dir: Path = Path("runs/demo")
    teacher: Path = BUNDLED_TEACHER
    start: str = "pretrained"
    baseline: str = DEMO_BASELINE
    steps: int = 240
    n_eval: int = 500
    seeds: tuple[int, ...] = (0, 1)
    train_per_task: int = 4000
    jobs: int = 2


def run_demo(s: DemoSettings) -> Path:
    """Distill the pretrained student with HPD and with the baseline (every seed, runs side by
    side), score teacher, initial student and students on the same held-out problems, print the
    table and the paired difference with its 95% interval."""
    from hpd.apps.bench import BenchSettings, manifest_settings
    from hpd.apps.bench_manifest import check_manifest, exclusive

    if not (s.teacher / "config.json").is_file():
        raise HPDError(f"no teacher at {s.teacher}: pass --teacher DIR, or rebuild the bundled one with "
                       "`bash scripts/build_teacher.sh`")
    preflight_tasks()
    out = Path(s.out_dir)
    t_start = time.perf_counter()
    methods = ["hpd", s.baseline]
    bs = BenchSettings(out_dir=out, teacher=s.teacher, methods=methods, seeds=list(s.seeds), lr_grid=[1.0],
                       steps_pretrained=s.steps, steps_scratch=s.steps, n_eval=s.n_eval, n_val=max(1, min(100, s.n_eval)),
                       train_per_task=s.train_per_task, jobs=s.jobs)
    # One demo per --out, and never one that reuses data or runs made with other settings.
    with exclusive(out, "hpd demo"):
        check_manifest(out, manifest_settings(replace(bs, starts=[s.start], data=["gold"])))
        return _demo(s, bs, out, t_start)


def _demo(s: DemoSettings, bs: BenchSettings, out: Path, t_start: float) -> Path:
    """The demo itself, with OUT held and its record checked (`run_demo`)."""
    from hpd.apps.bench import Condition, gold_data, heldout_data, resolve_start, run_all, run_spec, score_model
    from hpd.apps.bench_report import method_runs, paired_diff
    from hpd.apps.plots import plot_runs

    methods = bs.methods
    start = resolve_start(s.start, bs)
    train, val = gold_data(out / "data", list(TASKS), bs)
    test = heldout_data(out / "data", list(TASKS), s.n_eval, "tasks")
    print(f"[demo] teacher {s.teacher}; student start {start.name}; distilling with {' and '.join(methods)} "
          f"for {s.steps} steps, seeds {list(s.seeds)}", flush=True)
    rows: list[dict] = []
    specs = {}
    for m in methods:
        cond = Condition(f"{start.name}-gold", replace(start, lr=DEMO_RATES.get(m, start.lr)), "gold", s.teacher,
                         train, val, test, "task", note="gold references")
        # The demo scores each student on the test split only (no learning-rate grid, no curve here).
        specs[m] = (cond, [replace(run_spec(cond, m, cond.start.lr, seed, bs), evals=(("test", str(test)),), curve=False)
                           for seed in s.seeds])
    # The teacher and the initial student are scored in a worker of their own while the students
    # train, so the demo's wall time is its CPU time over the cores, not their sum.
    import concurrent.futures as cf
    import multiprocessing as mp

    fixed = [(name, model_dir, out / "eval" / f"{name.replace(' ', '-')}.json")
             for name, model_dir in [("teacher", s.teacher), ("initial student", start.model)] if model_dir is not None]
    todo = [(name, model_dir, cache) for name, model_dir, cache in fixed if not cache.is_file()]
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        futures = [(cache, pool.submit(score_model, Path(model_dir), str(test), "task", None)) for _, model_dir, cache in todo]
        if todo:
            print(f"[demo] scoring the {' and the '.join(name for name, _, _ in todo)} alongside", flush=True)
        run_all([sp for _, sps in specs.values() for sp in sps], bs, "task")
        for cache, fut in futures:
            atomic_write_text(cache, json.dumps(fut.result()))  # makes OUT/eval
    for name, _, cache in fixed:
        rows.append({"name": name, "runs": {0: json.loads(cache.read_text())}})
    results = {m: method_runs(cond, m, cond.start.lr, bs) for m, (cond, _) in specs.items()}
    for m in methods:
        rows.append({"name": f"student {m}", "runs": results[m], "lr": specs[m][0].start.lr})
    diff = paired_diff(results[s.baseline], results["hpd"])
    table = format_table(rows)
    plots = plot_runs([sp.run_dir for m in methods for sp in specs[m][1][:1]], out / "plots")
    total = time.perf_counter() - t_start
    summary = (f"{s.baseline} minus hpd, mean accuracy points over {len(s.seeds)} seed(s) x {3 * s.n_eval} problems "
               f"with its 95% paired-bootstrap interval: {diff}")
    atomic_write_text(out / "results.json", json.dumps(
        [{"name": r["name"], "eval": _per_task(r["runs"]), "seeds": len(r["runs"])} for r in rows] + [{"paired": diff}], indent=2))
    readings = f"Where HPD's claims hold and where they do not, at every scale measured: {READINGS}"
    atomic_write_text(out / "results.md", (
        f"# hpd demo\n\nTeacher {s.teacher}; student start `{start.name}`; {s.steps} steps (batch 32) on the same gold data; "
        f"held-out accuracy on {s.n_eval} problems per task (greedy), mean over seeds.\n\n{table}\n\n{summary}\n\n"
        f"{readings}\n"))
    print()
    print(table)
    print()
    print(summary)
    print(f"[demo] done in {total:.0f} s. Table: {out / 'results.md'}; plots: {out / 'plots'} ({len(plots)} figures); "
          f"students: {specs['hpd'][1][0].run_dir / 'final'}")
    print(f"[demo] {readings}")
    return out


def _per_task(runs: dict) -> dict[str, float]:
    """Accuracy per task (0-1), the mean over the scored runs (seeds)."""
    from hpd.apps.bench_report import task_accuracy

    out: dict[str, list[float]] = {}
    for r in runs.values():
        for t in TASKS:
            if (a := task_accuracy(r, t)) is not None:
                out.setdefault(t, []).append(a)
    return {t: sum(v) / len(v) for t, v in out.items()}


def format_table(rows: list[dict]) -> str:
    head = "| model | seeds | " + " | ".join(TASKS) + " | mean |"
    lines = [head, "|" + "---|" * (len(TASKS) + 3)]
    for r in rows:
        acc = _per_task(r["runs"])
        cells = [f"{100 * acc[t]:.1f}%" if t in acc else "-" for t in TASKS]
        mean = sum(acc.values()) / len(acc) if acc else float("nan")
        lines.append(f"| {r['name']} | {len(r['runs'])} | " + " | ".join(cells) + f" | {100 * mean:.1f}% |")
    return "\n".join(lines)
