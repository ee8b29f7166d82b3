"""Cached teacher vs online teacher vs plain SFT: step time, cache size, held-out accuracy.

On the bundled-task recipe (`hpd demo`'s default student, `hpd.apps.demo.student_config`, data from
`hpd.apps.demo.write_task_data`, the bundled teacher `hpd/assets/teacher`), one process at a time,
one torch thread each (OMP_NUM_THREADS=1):

1. builds a teacher cache over the training and held-out files with `hpd cache-teacher`'s
   function (top-K = `--top-k`, float16 log-probabilities), timing it;
2. trains, at the same steps, batch, learning rate and seed: `sft` without a teacher (the plain
   SFT step), `hpd` with the online teacher, `hpd` with the cached teacher; diagnostics (which cost
   a full-vocabulary pass) are computed at step 0 only, so the steps time the objective alone;
3. times the steps again in `--timing-rounds` rounds of `--timing-steps` steps per method, the
   order of the methods rotating from round to round, so that the load of a shared machine falls
   on all of them alike; the step time of a method is the median over rounds of its run's median
   `step_time_s` (first 5 steps left out as warm-up) and its ratio to SFT the median of the
   per-round ratios;
4. prints step times, tokens/s, the ratio to the SFT step, cache bytes per token and build time,
   and, with `--n-eval N`, held-out accuracy (greedy, `hpd.apps.experiments.evaluate_on_tasks`, seed 0)
   per task of the full-length runs.

Runs live in `OUT/runs/` and resume (finished runs are skipped), so an interrupted benchmark
continues where it stopped; the table goes to `OUT/results.md` and `OUT/results.json`.

    OMP_NUM_THREADS=1 python benchmarks/cached_teacher.py --out runs/bench-cache --steps 400 --n-eval 100
    OMP_NUM_THREADS=1 python benchmarks/cached_teacher.py --out /tmp/cache-smoke --steps 10 --per-task 100 --n-eval 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from hpd.apps.demo import BUNDLED_TEACHER, TASKS, student_config, write_task_data


def _step_stats(run_dir: Path, warmup: int = 5) -> dict:
    from hpd.apps.experiments import read_records

    recs = [r for r in read_records(run_dir) if r.get("step_time_s")]
    times = [r["step_time_s"] for r in recs if r["step"] > warmup]
    tokens = [r["tokens"] for r in recs if r["step"] > warmup]
    return {"steps": len(recs), "median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times),
            "tokens_per_s": sum(tokens) / sum(times), "elapsed_s": recs[-1]["elapsed_s"],
            "teacher_tokens_total": recs[-1]["teacher_tokens_total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--per-task", type=int, default=4000, help="training problems per task (the demo's 4000)")
    ap.add_argument("--n-eval", type=int, default=100, help="held-out problems per task for accuracy (0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", type=Path, default=BUNDLED_TEACHER)
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing-steps", type=int, default=60)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from hpd.apps.experiments import evaluate_on_tasks, run_configs
    from hpd.teachers.cache import TeacherCache, build_teacher_cache

    out = args.out
    train, eval_ = write_task_data(out, args.per_task, max(args.n_eval, 30), args.seed)

    def cfg(name: str, objective: str, extra: list[str], steps: int = args.steps, where: str = "runs"):
        return student_config(out / where / name, args.teacher, train, eval_, objective=objective, steps=steps,
                              seed=args.seed, extra=["log.every=1", "log.diagnostics_every=1000000", *extra])

    cache_dir = out / f"cache-k{args.top_k}"
    probe = cfg("probe", "hpd", [])
    if not (cache_dir / "manifest.json").is_file():
        build_teacher_cache(args.teacher, [train, eval_], cache_dir, top_k=args.top_k, data=probe.data,
                            temperature=probe.objective.temperature)
    manifest = TeacherCache(cache_dir).manifest

    methods = {
        "sft (no teacher)": ("sft", "sft", ["teacher.path=none"]),
        "hpd, online teacher": ("hpd-online", "hpd", []),
        f"hpd, cached teacher (K={args.top_k})": ("hpd-cached", "hpd", [f"teacher.cache={cache_dir}"]),
    }
    runs = {label: cfg(*m) for label, m in methods.items()}
    threads = int(os.environ["OMP_NUM_THREADS"])
    # One run at a time, one thread each.
    run_configs(list(runs.values()), jobs=1, labels=list(runs), threads_per_job=threads)
    labels = list(methods)
    rounds: list[dict[str, dict]] = []
    for r in range(args.timing_rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        cfgs = [cfg(f"r{r}-{methods[m][0]}", methods[m][1], [*methods[m][2], "log.eval_every=0"],
                    steps=args.timing_steps, where="timing") for m in order]
        run_configs(cfgs, jobs=1, labels=[f"timing {r}: {m}" for m in order], threads_per_job=threads)
        rounds.append({m: _step_stats(Path(c.output_dir)) for m, c in zip(order, cfgs)})

    rows = []
    for label, c in runs.items():
        run_dir = Path(c.output_dir)
        row = {"method": label, "full_run": _step_stats(run_dir)}
        if rounds:
            row["rounds_median_step_s"] = [rd[label]["median_step_s"] for rd in rounds]
            row["median_step_s"] = statistics.median(row["rounds_median_step_s"])
            row["x_sft"] = statistics.median(rd[label]["median_step_s"] / rd[labels[0]]["median_step_s"] for rd in rounds)
            row["tokens_per_s"] = statistics.median(rd[label]["tokens_per_s"] for rd in rounds)
        else:
            row.update(median_step_s=row["full_run"]["median_step_s"], tokens_per_s=row["full_run"]["tokens_per_s"])
        if args.n_eval:
            cached = run_dir / f"accuracy-n{args.n_eval}.json"
            if not cached.is_file():
                ev = evaluate_on_tasks(run_dir / "final", list(TASKS), n=args.n_eval, seed=args.seed)
                cached.write_text(json.dumps(ev))
            row["accuracy"] = json.loads(cached.read_text())
        rows.append(row)
    for row in rows:
        row.setdefault("x_sft", row["median_step_s"] / rows[0]["median_step_s"])
    lines = [
        f"{args.steps} steps, batch {probe.optim.batch_size}, seed {args.seed}, data.max_length {probe.data.max_length}, "
        f"{manifest['examples']} cached sequences ({manifest['positions']} response tokens), "
        f"torch threads {os.environ['OMP_NUM_THREADS']}",
        "",
        f"Cache: top-{manifest['top_k']}, {manifest['logp_dtype']} log-probs, {manifest['id_dtype']} ids: "
        f"{manifest['bytes_per_token']} bytes per token, {manifest['bytes'] / 2**20:.1f} MiB, built in "
        f"{manifest['build_seconds']:.1f} s (one teacher pass over every sequence).",
        "",
        f"Step time: median over {len(rounds)} rounds of {args.timing_steps}-step runs (rotating order) of each "
        "run's median step; x sft: median of the per-round ratios. Full run: the "
        f"{args.steps}-step run's median step, teacher forward tokens and train wall time (one pass, not "
        "interleaved)." + (f" Accuracy: the {args.steps}-step students, {args.n_eval} held-out problems per task, "
                           "greedy, 95% Wilson interval in brackets." if args.n_eval else ""),
        "",
        "| method | step s | per round | x sft step | tokens/s | full run: step s | teacher fwd tokens | wall s |"
        + ("".join(f" {t} |" for t in TASKS) + " mean acc |" if args.n_eval else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" * (len(TASKS) + 1) if args.n_eval else ""),
    ]
    for r in rows:
        f = r["full_run"]
        per = ", ".join(f"{x:.3f}" for x in r.get("rounds_median_step_s", []))
        line = (f"| {r['method']} | {r['median_step_s']:.3f} | {per} | {r['x_sft']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{f['median_step_s']:.3f} | {f['teacher_tokens_total']:.0f} | {f['elapsed_s']:.0f} |")
        if args.n_eval:
            acc = r["accuracy"]
            line += "".join(f" {100 * acc[t]['accuracy']:.1f}% ({100 * acc[t]['ci_low']:.0f}-{100 * acc[t]['ci_high']:.0f}) |"
                            for t in TASKS)
            line += f" {100 * sum(acc[t]['accuracy'] for t in TASKS) / len(TASKS):.1f}% |"
        lines.append(line)
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"manifest": {k: v for k, v in manifest.items() if k != "shards"},
                                                  "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
