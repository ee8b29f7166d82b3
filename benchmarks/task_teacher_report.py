"""The table of benchmarks/task_teacher.sh (issue 37, item 2), markdown on stdout, from what has finished.

Per student (a cut of the teacher's layers) and method, at the rate its seed-0 validation score
picks (the same grid for every method; one table per criterion, as `hpd bench` tunes long math
chains: validation accuracy, and validation steps right, `--criteria`):
- test accuracy by the task's verifier, per seed and mean, and as a fraction of the teacher's
  (greedy, the same held-out problems);
- the paired difference against HPD (points, 95% bootstrap interval over problems and seeds,
  `hpd.apps.bench_report.paired_diff`), and the share of steps right (the math task's graded score);
- generation speed against the teacher (`speed.json`: greedy tokens/s, one process, same prompts);
- CPU seconds to 90% of the best: the first checkpoint of the seed-0 curve (every quarter of the
  run, on the first N_CURVE test problems) that reaches 90% of the best final curve score of the
  cut's methods, as in `hpd bench`;
- the pruned student's score before training (`eval-start-test.json`), where every method starts;
- whether it meets the target a user would care about: >= 90% of the teacher's accuracy at
  >= 1.7x its speed;
and HPD's diagnostics (`hpd.apps.bench_report.hpd_diagnostics`). Runs still missing show as "-".

    python benchmarks/task_teacher_report.py --runs runs/task-teacher
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

from hpd.apps.bench import TUNING, RunSpec, best_rate, graded_scores, mean_graded, validation_score
from hpd.apps.bench_report import _fmt, curve, curve_score, hpd_diagnostics, paired_diff, run_summary
from hpd.stats import wilson_interval

TARGET_FRACTION, TARGET_SPEED = 0.9, 1.7


def _runs_of(method_dir: Path) -> dict[str, dict[int, Path]]:
    """rate -> seed -> run directory, from the `lrRATE-sSEED` names."""
    out: dict[str, dict[int, Path]] = {}
    for d in sorted(method_dir.glob("lr*-s*")):
        if d.is_dir():
            rate, seed = d.name[2:].rsplit("-s", 1)
            out.setdefault(rate, {})[int(seed)] = d
    return out


def _spec(method: str, run: Path, rate: str, seed: int) -> RunSpec:
    return RunSpec("task-teacher", method, float(rate), seed, run, (), ())


def _val(run: Path, on: str, val_file: Path) -> float | None:
    """A seed-0 run's validation score by criterion `on` (`hpd.apps.bench.validation_score`), None until scored."""
    p = run / "eval-val.json"
    return validation_score(json.loads(p.read_text()), on, val_file, "task") if p.is_file() else None


def _picked(val: dict[str, float | None], grid: list[str], base: float) -> str | None:
    """The grid rate of the best seed-0 validation score (`hpd.apps.bench.best_rate`: ties go to the
    rate nearest the base rate); None until every rate is scored."""
    if any(val.get(r) is None for r in grid):
        return None
    picked = best_rate({float(r): val[r] for r in grid}, base)
    return next(r for r in grid if float(r) == picked)


def _graded(rows_file: Path, ev: dict) -> list[float | None] | None:
    """Per-problem share of steps right of a scored file's answers to `rows_file` (the bench's
    `graded_scores`: the task verifier's partial credit; an error if they answer another file)."""
    answers = ev.get("completions")
    return None if answers is None else graded_scores(answers, rows_file, "task")


def _steps_right(rows_file: Path, ev: dict) -> float | None:
    return mean_graded(_graded(rows_file, ev))


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _score_line(rows_file: Path, ev: dict) -> str:
    """`k/n = x% [Wilson 95%]; steps right y%` of one scored file (`eval-*.json`)."""
    n, k = len(ev["verdicts"]), sum(ev["verdicts"])
    lo, hi = wilson_interval(k, n)
    return (f"{k}/{n} = {100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]; steps right "
            f"{_fmt(_pct(_steps_right(rows_file, ev)), '.1f')}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/task-teacher")
    ap.add_argument("--base-lr", type=float, default=5e-4, help="the grid's base rate (ties go to the rate nearest it)")
    ap.add_argument("--lr-grid", default="0.333 1", help="the grid's multipliers of --base-lr (the script's LR_GRID)")
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--criteria", default="accuracy graded",
                    help="what picks the rate, one table each (the script's CRITERIA; hpd.apps.bench.TUNING)")
    a = ap.parse_args()
    grid = [f"{a.base_lr * float(m):.2e}" for m in a.lr_grid.split()]  # the run directories' names, as the script writes them
    R = Path(a.runs)
    test_file = R / "data" / "test.jsonl"
    test_rows = [json.loads(x) for x in test_file.read_text().splitlines() if x.strip()]
    grade = functools.partial(_graded, test_file)
    print(f"# A task teacher and its pruned students ({R})\n")
    t_path = R / "teacher" / "eval-test.json"
    teacher = json.loads(t_path.read_text()) if t_path.is_file() else None
    if teacher:
        task = test_rows[0].get("meta", {})
        print(f"Teacher (SmolLM2-135M-Instruct after SFT, 30 layers), on the test problems (math, {task.get('steps')} "
              f"steps): {_score_line(test_file, teacher)}.")
    else:
        print("Teacher: not scored yet.")
    stats = R / "data" / "train.stats.json"
    if stats.is_file():
        s = json.loads(stats.read_text())
        print(f"Off-policy data: {s['rows']} answers of the writer ({s['writer']}), sampled at T=1, mistakes kept: "
              f"{s['wrong']} wrong ({100 * s['wrong_share']:.1f}%); {100 * s['steps_right']:.1f}% of steps right.")
    print()
    t_acc = teacher["accuracy"] if teacher else None
    val_file = R / "data" / "val.jsonl"
    criteria = a.criteria.split()
    if not criteria or any(on not in TUNING for on in criteria):
        ap.error(f"--criteria {a.criteria!r}: name one or more of {', '.join(TUNING)}")
    mark = {"accuracy": "*", "graded": "+"}
    short = {"accuracy": "accuracy", "graded": "steps right"}  # TUNING's criteria, in a table's words
    for cut_dir in sorted(p for p in R.glob("every*") if p.is_dir()):
        methods = sorted((p.name for p in cut_dir.iterdir() if p.is_dir()), key=lambda m: (m != "hpd", m))
        runs_of = {m: _runs_of(cut_dir / m) for m in methods}
        grids = {on: {m: {r: _val(seeds[a.seed0], on, val_file) if a.seed0 in seeds else None
                          for r, seeds in runs_of[m].items()} for m in methods} for on in criteria}
        picks = {on: {m: _picked(grids[on][m], grid, a.base_lr) for m in methods} for on in criteria}

        @functools.cache
        def summaries_at(m: str, rate: str | None) -> dict[int, dict]:
            return {seed: s for seed, d in runs_of[m].get(rate or "", {}).items()
                    if (s := run_summary(_spec(m, d, rate, seed), grade=grade))}

        layers = {"every3": 10, "every2": 15}.get(cut_dir.name, "?")
        print(f"## {cut_dir.name} ({layers} layers)\n")
        start_path = cut_dir / "eval-start-test.json"
        if start_path.is_file():  # the pruned student before training: where every method starts
            start = json.loads(start_path.read_text())
            print(f"Before training (the teacher's layers, pruned): {_score_line(test_file, start)}.\n")
        for on in criteria:
            picked = picks[on]
            summaries = {m: summaries_at(m, picked[m]) for m in methods}
            score = curve_score(on, test_file, "task")
            finals = {m: curve(_spec(m, runs_of[m][picked[m]][a.seed0], picked[m], a.seed0), score=score)
                      for m in methods if picked[m] and a.seed0 in runs_of[m].get(picked[m], {})}
            best = max((pts[-1][1] for pts in finals.values() if pts), default=None)
            print(f"Tuned on {TUNING[on]}: each method at the rate of the grid with the best seed-{a.seed0} score "
                  f"({mark[on]} below); CPU s to 90% of the best {short[on]}.\n")
            print(f"| method | val {short[on]} per rate | rate picked | test accuracy per seed | mean | of the teacher's | "
                  "vs HPD (points) | steps right % | steps right vs HPD | speed vs teacher (x) | CPU s to 90% of best | "
                  "CPU s per run | target |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for m in methods:
                runs = summaries[m]
                accs = [runs[s]["accuracy"] for s in sorted(runs)]
                mean = statistics.fmean(accs) if accs else None
                frac = mean / t_acc if mean is not None and t_acc else None
                val_cells = ", ".join(f"{r}: {_fmt(_pct(v), '.1f')}" for r, v in sorted(grids[on][m].items()))
                steps = [x for r in runs.values() if (x := mean_graded(r["partial"])) is not None]
                sp = cut_dir / m / "speed.json"
                speed = json.loads(sp.read_text())["ratio"] if sp.is_file() else None
                to90 = "-"
                if best is not None and finals.get(m):
                    hit = next((rec for _, acc, rec in finals[m] if acc >= 0.9 * best), None)
                    to90 = _fmt(hit.get("cpu_s"), ".0f") if hit else "not reached"
                cpu = statistics.fmean([r["cpu_s"] for r in runs.values() if r.get("cpu_s")] or [float("nan")])
                target = "-" if frac is None or speed is None else (
                    "yes" if frac >= TARGET_FRACTION and speed >= TARGET_SPEED else "no")
                ref = summaries.get("hpd") if m != "hpd" else None
                vs, vs_steps = (paired_diff(runs, ref), paired_diff(runs, ref, key="partial")) if ref else ("", "")
                print(f"| {m} | {val_cells or '-'} | {picked[m] or '-'} | {', '.join(f'{100 * x:.1f}' for x in accs) or '-'} | "
                      f"{_fmt(100 * mean if mean is not None else None, '.1f')} | {_fmt(frac, '.2f')} | {vs} | "
                      f"{_fmt(100 * statistics.fmean(steps) if steps else None, '.1f')} | {vs_steps} | {_fmt(speed, '.2f')} | "
                      f"{to90} | {_fmt(cpu, '.0f')} | {target} |")
            print()
        # The seed-0 grid behind the picks: near the floor, 100 validation problems separate little.
        val_names = " / ".join(f"validation {short[on]} %" for on in criteria)
        print(f"Seed {a.seed0} at every rate: {val_names} / test accuracy % / test steps right %:\n")
        print("| method | " + " | ".join(grid) + " |")
        print("|---|" + "---:|" * len(grid))
        for m in methods:
            cells = []
            for r in grid:
                d = runs_of[m].get(r, {}).get(a.seed0)
                ev_path = d / "eval-test.json" if d else None
                ev = json.loads(ev_path.read_text()) if ev_path and ev_path.is_file() else None
                marks = "".join(mark[on] for on in criteria if picks[on][m] == r)
                vals = " / ".join(_fmt(_pct(grids[on][m].get(r)), ".1f") for on in criteria)
                cells.append("-" if ev is None else f"{vals} / {100 * ev['accuracy']:.1f} / "
                             f"{_fmt(_pct(_steps_right(test_file, ev)), '.1f')}{marks}")
            print(f"| {m} | " + " | ".join(cells) + " |")
        print("\n" + "; ".join(f"{mark[on]} = the rate {TUNING[on]} picks" for on in criteria)
              + " (ties: the base rate).\n")
        hpd_picks = dict.fromkeys(picks[on].get("hpd") for on in criteria)
        diag = {f"{cut_dir.name} hpd (lr {r})": summaries_at("hpd", r) for r in hpd_picks if r and summaries_at("hpd", r)}
        if diag:
            print(hpd_diagnostics(diag))
    print(f"Target: a student that keeps >= {TARGET_FRACTION:.0%} of the teacher's accuracy at >= {TARGET_SPEED}x "
          "its generation speed. Accuracy is greedy, on the test problems; the rate is picked on validation.")


if __name__ == "__main__":
    main()
