"""The tables of `hpd bench`: equal-lr and tuned accuracy, paired differences against HPD,
stability, efficiency and HPD's own diagnostics, read from the runs' directories.

Nothing here trains: `hpd bench --report` calls `write_report` on whatever has finished, and a
missing run shows as fewer seeds (the `seeds` column), never as a silent zero.

    >>> from hpd.apps.bench_report import grad_norm_spread
    >>> grad_norm_spread([1.0, 1.0, 2.0, 2.0, 3.0])  # 90th percentile 3.0 over median 2.0
    1.5
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable

from hpd.apps.bench import (
    REFERENCE, TUNING, BenchSettings, Condition, RunSpec, eval_file, graded_scores, mean_graded, run_spec, tuned_lr,
    tuning_criteria,
)
from hpd.files import atomic_write_text


def loss_spikes(kl: list[float], window: int = 10, factor: float = 1.5,
                regimes: list[str] | None = None) -> int:
    """Logged steps whose KL exceeds `factor` x the median of the `window` before it.

    With `regimes` (one name per logged step), each step is compared only with earlier steps of
    its own regime: a method that alternates gold batches and its own rollouts (GKD) has a KL
    level per regime, and a switch between them is not a spike.
    """
    if regimes is not None:
        if len(regimes) != len(kl):
            raise ValueError(f"loss_spikes: {len(kl)} KL values but {len(regimes)} regimes")
        return sum(loss_spikes([k for k, g in zip(kl, regimes) if g == name], window, factor)
                   for name in dict.fromkeys(regimes))
    spikes = 0
    for i in range(window, len(kl)):
        med = statistics.median(kl[i - window:i])
        if med > 0 and kl[i] > factor * med:
            spikes += 1
    return spikes


def _finite(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The records whose `key` is a finite number (a step may log none, or NaN)."""
    return [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _spikes(train: list[dict[str, Any]]) -> int:
    """`loss_spikes` over a run's logged training KL, regime by regime."""
    rows = _finite(train, "kl")
    return loss_spikes([r["kl"] for r in rows], regimes=[str(r.get("regime", "")) for r in rows])


def grad_norm_spread(norms: list[float]) -> float:
    """The 90th percentile of the logged gradient norms over their median (1 = steady)."""
    norms = sorted(n for n in norms if math.isfinite(n))
    if not norms:
        return float("nan")
    q90 = norms[min(len(norms) - 1, int(round(0.9 * (len(norms) - 1))))]
    med = statistics.median(norms)
    return q90 / med if med > 0 else float("nan")


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records of one type; none while the run has not started."""
    from hpd.apps.experiments import read_records

    return read_records(run_dir, kind) if (run_dir / "metrics.jsonl").is_file() else []


def grader(cond: Condition, s: BenchSettings) -> Callable[[dict], list[float | None] | None]:
    """Per-problem graded scores of a scored run (`Verifier.partial_credit` on its kept answers), or
    None where the run kept no answers or the verifier does not grade."""
    def grade(ev: dict) -> list[float | None] | None:
        answers = ev.get("completions")
        return None if answers is None else graded_scores(answers, cond.test, cond.verifier, s.answer_pattern)
    return grade


def run_summary(spec: RunSpec, max_grad_norm: float = 1.0,
                grade: Callable[[dict], list[float | None] | None] | None = None) -> dict[str, Any] | None:
    """A finished run's test verdicts and training figures; None while it has not finished."""
    test = eval_file(spec.run_dir, "test")
    if not test.is_file():
        return None
    ev = json.loads(test.read_text())
    train = _records(spec.run_dir, "train")
    last = train[-1] if train else {}
    num = lambda k: [r[k] for r in _finite(train, k)]  # noqa: E731
    norms = num("grad_norm")
    out = {
        "verdicts": ev["verdicts"], "tasks": ev["tasks"], "accuracy": ev["accuracy"],
        "partial": grade(ev) if grade is not None else None,
        "cpu_s": last.get("cpu_s"), "wall_s": last.get("elapsed_s"),
        "teacher_tokens": last.get("teacher_tokens_total"), "generated_tokens": last.get("generated_tokens_total"),
        "spikes": _spikes(train), "gn_spread": grad_norm_spread(norms),
        "clipped": (sum(n > max_grad_norm for n in norms) / len(norms)) if norms and max_grad_norm > 0 else float("nan"),
        "skipped": len(_records(spec.run_dir, "skip")),
        "run": f"{spec.method}/{spec.run_dir.name}",
        # The code of each training start and of the test score (none for runs made before hpd recorded it).
        "code": [*_records(spec.run_dir, "code"), *([ev["code"]] if ev.get("code") else [])],
    }
    for key in ("frac_A", "frac_B", "r_hat_mean", "r_mean", "topk_push", "frac_teacher_top1_is_y"):
        vals = num(key)
        out[key] = statistics.fmean(vals) if vals else None
    mins = num("r_hat_min")
    out["r_hat_min"] = min(mins) if mins else None
    out["grad_norm_median"] = statistics.median(norms) if norms else None
    return out


def curve(spec: RunSpec, score: Callable[[dict], float | None] | None = None) -> list[tuple[int, float, dict]]:
    """(step, score on the curve subset, the train record at that step) for each scored checkpoint;
    `score` reads a checkpoint's eval record (default: its accuracy; None skips the point)."""
    train = {r["step"]: r for r in _records(spec.run_dir, "train")}
    points = []
    for path in sorted(spec.run_dir.glob("eval-curve-step*.json")):
        step = int(path.stem.split("step")[1])
        rec = train.get(step) or max((r for s, r in train.items() if s <= step), key=lambda r: r["step"], default={})
        value = (score or (lambda ev: ev["accuracy"]))(json.loads(path.read_text()))
        if value is not None:
            points.append((step, value, rec))
    return sorted(points, key=lambda p: p[0])


def curve_score(on: str, rows_file: Path, verifier: str, answer_pattern: str | None = None) -> Callable[[dict], float | None]:
    """How a checkpoint of the curve (answers to the first rows of `rows_file`) is scored in the table
    tuned `on`: accuracy, or the mean graded score."""
    def graded(ev: dict) -> float | None:
        if ev.get("completions") is None:
            return None
        return mean_graded(graded_scores(ev["completions"], rows_file, verifier, answer_pattern, first=True))
    return (lambda ev: ev["accuracy"]) if on == "accuracy" else graded


def code_note(runs: list[dict[str, Any]]) -> str:
    """Which code trained and scored `runs` (run summaries): one line, marked **mixed** where they
    differ, since figures of two versions need not agree to the digit."""
    from hpd.provenance import describe_code

    versions: dict[tuple, dict[str, Any]] = {}
    members: dict[tuple, list[str]] = {}
    unrecorded = []
    for r in runs:
        if not r.get("code"):
            unrecorded.append(r["run"])
        for c in r.get("code") or []:
            key = (c.get("source"), c.get("torch"), c.get("transformers"))
            versions.setdefault(key, c)
            if r["run"] not in members.setdefault(key, []):
                members[key].append(r["run"])
    if not versions:
        return "Code: not recorded (runs made before hpd recorded the code of each run).\n" if runs else ""
    if len(versions) == 1 and not unrecorded:
        (rec,) = versions.values()
        return f"Code: every run trained and scored by {describe_code(rec)}.\n"

    def listed(names: list[str]) -> str:
        return f"{len(names)} runs" + (f" ({', '.join(names)})" if len(names) <= 6 else "")

    parts = [f"{describe_code(rec)}: {listed(members[key])}" for key, rec in versions.items()]
    if unrecorded:
        parts.append(f"not recorded (made before hpd recorded it): {listed(unrecorded)}")
    return (f"**Code: mixed.** These runs were trained or scored by more than one version of the code: "
            + "; ".join(parts) + ". Figures from different code need not agree to the digit; for one version, "
            "delete the other runs' directories (OUT/runs, and the archive's copies) and run the bench again.\n")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def task_accuracy(run: dict, task: str) -> float | None:
    """A scored run's accuracy (0-1) on one task's problems; None if it has none of them."""
    vs = [v for v, t in zip(run["verdicts"], run["tasks"]) if t == task]
    return sum(vs) / len(vs) if vs else None


def paired_diff(runs: dict[int, dict], ref: dict[int, dict], key: str = "verdicts") -> str:
    """Mean difference (points) against the reference, with the 95% paired-bootstrap interval.

    key: the per-problem scores compared: `verdicts` (0/1) or `partial` (a graded score in [0, 1],
    compared on the problems the verifier grades, e.g. only the math rows of a mixed test set)."""
    from hpd.stats import paired_bootstrap

    seeds = sorted(s for s in set(runs) & set(ref) if runs[s].get(key) is not None and ref[s].get(key) is not None)
    if not seeds:
        return "-"
    if any(len(runs[s][key]) != len(ref[s][key]) for s in seeds):
        return "(different problems)"
    a = [[float(x) for x, y in zip(runs[s][key], ref[s][key]) if x is not None and y is not None] for s in seeds]
    b = [[float(y) for x, y in zip(runs[s][key], ref[s][key]) if x is not None and y is not None] for s in seeds]
    d = paired_bootstrap(a, b, n_boot=2000, seed=0)
    return f"{100 * d.diff:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


def method_runs(cond: Condition, method: str, lr: float, s: BenchSettings) -> dict[int, dict]:
    out = {}
    for seed in s.seeds:
        summ = run_summary(run_spec(cond, method, lr, seed, s), grade=grader(cond, s))
        if summ is not None:
            out[seed] = summ
    return out


def _failed(cond: Condition, method: str, lr: float, s: BenchSettings) -> int:
    return sum((run_spec(cond, method, lr, seed, s).run_dir / "failed.json").is_file() for seed in s.seeds)


def condition_tables(cond: Condition, s: BenchSettings) -> str:
    tasks = []
    lines: list[str] = []
    equal = {m: method_runs(cond, m, cond.start.lr, s) for m in s.methods}
    # One tuned table per criterion (validation accuracy; the graded score where every problem is graded).
    criteria = tuning_criteria(cond, s)
    rates_on = {on: {m: tuned_lr(cond, m, s, on) for m in s.methods} for on in criteria}
    # Where the tuned rate is the base rate the runs are the same ones: summarized once.
    tuned_on = {on: {m: equal[m] if rates[m][0] == cond.start.lr else method_runs(cond, m, rates[m][0], s)
                     for m in s.methods} for on, rates in rates_on.items()}
    for runs in list(equal.values()) + [r for tuned in tuned_on.values() for r in tuned.values()]:
        for r in runs.values():
            tasks = list(dict.fromkeys([*tasks, *r["tasks"]]))
    n_test = max((len(r["verdicts"]) for runs in equal.values() for r in runs.values()), default=0)
    # A graded score (math's steps right) where the verifier gives one: it separates students that
    # all fail a long chain as a whole.
    graded = any(r.get("partial") is not None for runs in [*equal.values(), *(r for t in tuned_on.values() for r in t.values())]
                 for r in runs.values())

    def table(on: str | None, chosen: dict[str, dict[int, dict]], rates: dict[str, float]) -> list[str]:
        """`on`: the tuning criterion of a tuned table, None for the equal-lr table."""
        cols = ["lr", "seeds", *tasks, "mean", "std (seeds)", f"vs {REFERENCE}: diff [95% CI]",
                *(["steps right %", f"steps right vs {REFERENCE}"] if graded else []), "spikes",
                "grad-norm p90/p50", "clipped", "CPU s"]
        if on is not None:
            cols += ["val acc lost across grid" if on == "accuracy" else "val steps right lost across grid",
                     "CPU s to 90% best", "teacher tok to 90%", "student gen tok to 90%"]
        out = [f"| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        score = curve_score(on, cond.test, cond.verifier, s.answer_pattern) if on is not None else None
        best = _best_curve(cond, s, rates_on[on], score) if on is not None else None
        for m in s.methods:
            runs = chosen[m]
            fails = _failed(cond, m, rates[m], s)
            cells = [f"{rates[m]:.2g}", f"{len(runs)}" + (f" (+{fails} failed)" if fails else "")]
            for t in tasks:
                mean, std = _mean_std([100 * a for r in runs.values() if (a := task_accuracy(r, t)) is not None])
                cells.append(f"{_fmt(mean, '.1f')} ± {_fmt(std, '.1f')}")
            mean, std = _mean_std([100 * r["accuracy"] for r in runs.values()])
            cells += [_fmt(mean, ".1f"), _fmt(std, ".1f"), "ref" if m == REFERENCE else paired_diff(runs, chosen[REFERENCE])]
            if graded:
                scores = [100 * statistics.fmean(p for p in r["partial"] if p is not None)
                          for r in runs.values() if r.get("partial")]
                mean, std = _mean_std(scores)
                cells += [f"{_fmt(mean, '.1f')} ± {_fmt(std, '.1f')}" + (f" ({len(scores)})" if len(scores) != len(runs) else ""),
                          "ref" if m == REFERENCE else paired_diff(runs, chosen[REFERENCE], "partial")]
            for key, spec in (("spikes", ".1f"), ("gn_spread", ".2f"), ("clipped", ".0%"), ("cpu_s", ".0f")):
                cells.append(_fmt(_mean_std([r.get(key) for r in runs.values()])[0], spec))
            if on is not None:
                vals = [a for a in rates_on[on][m][1].values() if a is not None]
                cells.append(_fmt(100 * (max(vals) - min(vals)) if len(vals) > 1 else None, ".1f"))
                cells += _to_threshold(cond, m, rates_on[on][m][0], s, best, score)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        return out

    lines.append(f"### {cond.name}\n")
    lines.append(f"Start `{cond.start.name}` ({cond.start.steps} steps, base lr {cond.start.lr:g}); data: {cond.note}; "
                 f"teacher {_teacher_name(cond.teacher)}; {n_test} test problems ({', '.join(tasks)}), verifier `{cond.verifier}`.\n")
    if graded:
        lines.append("`steps right %`: the verifier's graded score (math: the share of the reference's steps an answer "
                     "does right, each applied to the answer's own running value); mean over the problems it grades, then mean ± std "
                     "over seeds, with a count in brackets when fewer seeds kept their answers; "
                     f"`steps right vs {REFERENCE}`: the paired difference on it, as for accuracy.\n")
    lines.append(f"Equal learning rate ({cond.start.lr:g} for every method), accuracy % (mean ± std over seeds):\n")
    lines += table(None, equal, {m: cond.start.lr for m in s.methods})
    lines.append("")
    grid = ", ".join(f"{cond.start.lr * g:.2g}" for g in s.lr_grid)
    for on in criteria:
        title = "Tuned" if on == "accuracy" else "Tuned on steps right"
        why = ("" if on == "accuracy" else "; whole-chain accuracy at the floor would choose a rate on a problem or two, "
               "so the graded score chooses too, and the efficiency columns read 90% of the best steps right")
        lines.append(f"{title}: each method at the rate of the grid ({grid}) with the best {TUNING[on]} "
                     f"(seed {s.seeds[0]}){why}:\n")
        lines += table(on, tuned_on[on], {m: rates_on[on][m][0] for m in s.methods})
        lines.append("")
    shown = {id(r): r for runs in [*equal.values(), *(r for t in tuned_on.values() for r in t.values())]
             for r in runs.values()}
    lines.append(code_note(list(shown.values())))
    # Every method whose runs log HPD's weight statistics (hpd, and objectives built on its weights).
    labels = {"accuracy": "tuned", "graded": "tuned on steps right"}
    for m in s.methods:
        by_table = {"equal lr": equal.get(m, {}), **{labels[on]: tuned_on[on].get(m, {}) for on in criteria}}
        if m == REFERENCE or any(r.get("frac_A") is not None for runs in by_table.values() for r in runs.values()):
            lines.append(hpd_diagnostics(by_table, m))
    return "\n".join(lines) + "\n"


def _teacher_name(path: Path) -> str:
    from hpd.apps.recipe import BUNDLED_TEACHER

    return "the bundled one" if Path(path).resolve() == BUNDLED_TEACHER.resolve() else str(path)


def _best_curve(cond: Condition, s: BenchSettings, rates: dict[str, tuple[float, dict]],
                score: Callable[[dict], float | None] | None = None) -> float | None:
    finals = []
    for m in s.methods:
        pts = curve(run_spec(cond, m, rates[m][0], s.seeds[0], s), score)
        if pts:
            finals.append(pts[-1][1])
    return max(finals) if finals else None


def _to_threshold(cond: Condition, m: str, lr: float, s: BenchSettings, best: float | None,
                  score: Callable[[dict], float | None] | None = None) -> list[str]:
    pts = curve(run_spec(cond, m, lr, s.seeds[0], s), score)
    if best is None or not pts:
        return ["-", "-", "-"]
    for _, acc, rec in pts:
        if acc >= 0.9 * best:
            return [_fmt(rec.get("cpu_s"), ".0f"), _fmt(rec.get("teacher_tokens_total"), ".2e"),
                    _fmt(rec.get("generated_tokens_total"), ".2e")]
    return ["not reached"] * 3


def hpd_diagnostics(by_table: dict[str, dict[int, dict]], method: str = "hpd") -> str:
    """HPD's weight statistics (and the top-k ones, where logged) averaged over a method's runs, one
    line per table (`by_table`: the table's label -> its runs by seed)."""
    def line(label: str, runs: dict[int, dict]) -> str:
        if not runs:
            return f"- {label}: no finished run"
        g = lambda k: _mean_std([r.get(k) for r in runs.values()])[0]  # noqa: E731
        rmin = min((r["r_hat_min"] for r in runs.values() if r.get("r_hat_min") is not None), default=None)
        push = g("topk_push")
        return (f"- {label}: frac_A {_fmt(g('frac_A'), '.2f')}, frac_B {_fmt(g('frac_B'), '.2f')}, "
                f"r mean {_fmt(g('r_mean'), '.3f')}, r_hat mean {_fmt(g('r_hat_mean'), '.2f')} (min {_fmt(rmin, '.1f')}), "
                f"grad norm median {_fmt(g('grad_norm_median'), '.2f')}, clipped {_fmt(g('clipped'), '.0%')} of logged steps"
                + (f", top-k push {_fmt(push, '.3f')}, teacher's top-1 is y {_fmt(g('frac_teacher_top1_is_y'), '.2f')}"
                   if not math.isnan(push) else ""))
    title = "HPD's" if method == "hpd" else f"{method}'s"
    return (f"{title} diagnostics (training-step means over logged steps):\n\n"
            + "".join(line(label, runs) + "\n" for label, runs in by_table.items()))


def write_report(s: BenchSettings, conditions: list[Condition], missing: list[str]) -> Path:
    out = Path(s.out_dir)
    parts = [f"# hpd bench\n\nMethods {', '.join(s.methods)}; seeds {s.seeds}; learning-rate grid "
             f"{s.lr_grid} x each start's base rate, chosen on a validation split of the training problems; "
             f"paired differences against {REFERENCE} are mean accuracy points with a 95% bootstrap interval "
             f"over problems and seeds (positive: the method beats {REFERENCE}).\n"]
    if missing:
        parts.append("Not run here:\n\n" + "\n".join(f"- {m}" for m in missing) + "\n")
    for cond in conditions:
        parts.append(condition_tables(cond, s))
    path = out / "results.md"
    atomic_write_text(path, "\n".join(parts))
    return path
