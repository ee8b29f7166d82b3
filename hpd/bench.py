"""`hpd bench`: objectives x regimes x seeds on the bundled tasks, at equal steps and batch size.

Every method distills the bundled teacher into the default student (`hpd.demo.STUDENT_OVERRIDES`)
on the same training problems for the same number of optimizer steps, then is scored on held-out
problems of every task. Reported per method: accuracy per task (mean and std over seeds), wall
time, teacher forward tokens, student generated tokens, and stability figures: loss spikes (logged
steps whose KL to the teacher jumps above 1.5x the median of the 10 before), the std of the mean
accuracy over seeds, and the final teacher-student agreement on held-out data.

Each run keeps its directory under `OUT/runs/`, so an interrupted benchmark resumes: finished
runs are skipped, unfinished ones resume from their checkpoint, evaluations are cached in
`OUT/runs/<run>/bench.json`.

    hpd bench --out runs/bench                   # the full table (about an hour on 2 free cores)
    hpd bench --smoke --out /tmp/bench-smoke     # a small setting (CI)
    hpd bench --out runs/bench --report          # the table of the runs finished so far (no training)
    hpd bench --methods sft,hpd --seeds 0 --set optim.lr=1e-2 --out runs/bench-lr1e-2   # one knob changed
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpd.demo import BUNDLED_TEACHER, TASKS, preflight_tasks, student_config, write_task_data
from hpd.errors import HPDError

# label -> (objective, extra overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "sft": ("sft", []),
    "fkl": ("fkl", []),
    "rkl": ("rkl", []),
    "jsd": ("jsd", ["objective.beta=0.5"]),
    "skl": ("skl", []),
    "akl": ("akl", []),
    "todi": ("todi", []),
    "orkl (on-policy)": ("orkl", ["regime.name=student"]),
    "gkd (jsd mixed 0.5)": ("jsd", ["objective.beta=0.5", "regime.name=mixed", "regime.mixed_lambda=0.5"]),
    "hpd": ("hpd", []),
    "hpd (teacher data)": ("hpd", ["regime.name=teacher"]),
}
SMOKE_METHODS = ["sft", "hpd"]


@dataclass
class BenchSettings:
    out_dir: Path = Path("runs/bench")
    teacher: Path = BUNDLED_TEACHER
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 500
    n_eval: int = 100
    train_per_task: int = 4000
    jobs: int = 2
    overrides: list[str] = field(default_factory=list)  # applied to every run, after the method's own
    report_only: bool = False  # no training: the table of the runs finished so far


def loss_spikes(kl: list[float], window: int = 10, factor: float = 1.5) -> int:
    """Logged steps whose KL exceeds `factor` x the median of the `window` before it."""
    spikes = 0
    for i in range(window, len(kl)):
        med = statistics.median(kl[i - window:i])
        if med > 0 and kl[i] > factor * med:
            spikes += 1
    return spikes


def summarize_run(run_dir: Path, eval_results: dict) -> dict:
    from hpd.experiments import read_records

    train = read_records(run_dir, "train")
    evals = read_records(run_dir, "eval")
    last = train[-1] if train else {}
    kl = [r["kl"] for r in train if isinstance(r.get("kl"), (int, float))]
    return {
        "eval": eval_results,
        "wall_s": last.get("elapsed_s"),
        "cpu_s": last.get("cpu_s"),
        "teacher_tokens": last.get("teacher_tokens_total"),
        "generated_tokens": last.get("generated_tokens_total"),
        "spikes": loss_spikes(kl),
        "final_agreement": evals[-1].get("agreement") if evals else None,
        "final_kl": evals[-1].get("kl") if evals else None,
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def format_table(summary: dict[str, list[dict]]) -> str:
    cols = ["seeds", *TASKS, "mean acc", "std (seeds)", "wall s", "CPU s", "teacher fwd tok", "student gen tok", "spikes", "agreement"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, runs in summary.items():
        cells = [str(len(runs))]
        for t in TASKS:
            m, s = _mean_std([100 * r["eval"][t]["accuracy"] for r in runs])
            cells.append(f"{m:.1f} ± {s:.1f}")
        means = [100 * statistics.fmean(r["eval"][t]["accuracy"] for t in TASKS) for r in runs]
        m, s = _mean_std(means)
        cells += [f"{m:.1f}", f"{s:.1f}"]
        for key, fmt in (("wall_s", "{:.0f}"), ("cpu_s", "{:.0f}"), ("teacher_tokens", "{:.2e}"), ("generated_tokens", "{:.2e}"),
                         ("spikes", "{:.1f}"), ("final_agreement", "{:.3f}")):
            v, _ = _mean_std([r.get(key) for r in runs])
            cells.append("-" if v != v else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_bench(s: BenchSettings) -> Path:
    from hpd.experiments import evaluate_on_tasks, read_records, run_configs, run_slug
    from hpd.plots import plot_runs

    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise HPDError(f"unknown bench method(s) {unknown}; choose from: {', '.join(METHODS)}")
    if not (s.teacher / "config.json").is_file():
        raise HPDError(f"no teacher at {s.teacher}: pass --teacher DIR or run `bash scripts/build_teacher.sh`")
    preflight_tasks()
    out = Path(s.out_dir)
    t0 = time.perf_counter()
    train, eval_ = write_task_data(out, s.train_per_task, s.n_eval, 0)
    runs: list[tuple[str, int, Path]] = []
    cfgs = []
    for label in s.methods:
        objective, extra = METHODS[label]
        for seed in s.seeds:
            run_dir = out / "runs" / f"{run_slug(label)}-s{seed}"
            extra_all = [*extra, f"regime.teacher_cache={out / 'teacher_generations'}", *s.overrides]
            cfgs.append(student_config(run_dir, s.teacher, train, eval_, objective=objective, steps=s.steps, seed=seed,
                                       extra=extra_all))
            runs.append((label, seed, run_dir))
    if s.report_only:
        runs = [r for r in runs if (r[2] / "final" / "config.json").is_file()]
        if not runs:
            raise HPDError(f"no finished runs under {out / 'runs'} for these methods and seeds: run without --report first")
    else:
        run_configs(cfgs, jobs=s.jobs, labels=[d.name for _, _, d in runs])

    summary: dict[str, list[dict]] = {}
    for label, seed, run_dir in runs:
        cache = run_dir / "bench.json"
        if cache.is_file():
            ev = json.loads(cache.read_text())
        else:
            print(f"[bench] evaluating {run_dir.name}")
            ev = evaluate_on_tasks(run_dir / "final", list(TASKS), n=s.n_eval, seed=0)
            cache.write_text(json.dumps(ev))
        summary.setdefault(label, []).append(summarize_run(run_dir, ev))

    table = format_table(summary)
    plot_runs([d for _, seed, d in runs if seed == runs[0][1]], out / "plots")
    header = (f"hpd bench: {len(s.methods)} methods x seeds {s.seeds}, {s.steps} steps, batch 32, default student, "
              f"teacher {s.teacher}{', overrides ' + ' '.join(s.overrides) if s.overrides else ''}; "
              f"held-out accuracy (%) on {s.n_eval} problems per task, mean ± std over seeds")
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(header)
    print()
    print(table)
    print(f"\n[bench] done in {time.perf_counter() - t0:.0f} s: {out / 'results.md'}, plots in {out / 'plots'}")
    return out
