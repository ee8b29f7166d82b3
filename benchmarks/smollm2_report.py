"""Tables for the SmolLM2-135M distillation runs of benchmarks/smollm2_cpu.sh (markdown on stdout).

For the teacher, the initial student (the teacher's layers picked by the recipe, before training)
and each trained student: accuracy on held-out `capitals` questions (greedy, 95% Wilson interval);
teacher-student KL(p||q) and top-1 agreement per token on the teacher's greedy answers to the
held-out chat prompts (from the runs' evaluations: step 0 of the hpd run is the initial student);
tokens/s and peak memory of the training steps (from metrics.jsonl).

    python benchmarks/smollm2_report.py --runs runs/smollm2 --config configs/smollm2-135m-to-10l.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from hpd.config import load_config
from hpd.apps.evaluate import evaluate_model
from hpd.apps.experiments import read_records
from hpd.models import init_from_teacher, load_model


def _capitals(model, tok, n: int) -> str:
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        r = evaluate_model(model, tok, "capitals", n=n, batch_size=20, max_new_tokens=24)
    return (f"{r.correct}/{r.n} = {100 * r.accuracy:.0f}% [{100 * r.ci_low:.0f}, {100 * r.ci_high:.0f}]"
            f" ({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/smollm2")
    ap.add_argument("--config", default="configs/smollm2-135m-to-10l.yaml")
    ap.add_argument("--methods", default="hpd,sft,fkl")
    ap.add_argument("--n", type=int, default=60, help="held-out capitals questions")
    args = ap.parse_args()
    runs, cfg = Path(args.runs), load_config(args.config)
    methods = [m for m in args.methods.split(",") if (runs / m / "final").is_dir()]

    teacher, tok = load_model(cfg.teacher.path)
    rows = [("teacher (30 layers)", _capitals(teacher, tok, args.n), None)]
    student0 = init_from_teacher(teacher, cfg.student.init_from_teacher)
    hpd_evals = read_records(runs / "hpd", "eval") if (runs / "hpd" / "metrics.jsonl").is_file() else []
    first_eval = next((r for r in hpd_evals if r.get("step") == 0), None)
    rows.append((f"initial student ({cfg.student.init_from_teacher}, {student0.config.num_hidden_layers} layers)",
                 _capitals(student0, tok, args.n), first_eval))
    del student0
    for m in methods:
        model, _ = load_model(str(runs / m / "final"))
        last_eval = read_records(runs / m, "eval")[-1:]
        rows.append((f"{m} student", _capitals(model, tok, args.n), last_eval[0] if last_eval else None))

    print(f"| model | capitals (held-out, greedy; 95% CI) | held-out KL(p‖q) / token | held-out top-1 agreement |")
    print("|---|---|---|---|")
    for name, cap, ev in rows:
        kl = f"{ev['kl']:.3f}" if ev and "kl" in ev else "0 (itself)" if ev is None and name.startswith("teacher") else "n/a"
        ag = f"{100 * ev['agreement']:.1f}%" if ev and "agreement" in ev else "100%" if name.startswith("teacher") else "n/a"
        print(f"| {name} | {cap} | {kl} | {ag} |")

    print()
    print("| run | steps | train tokens/s (median over steps) | step time s (median) | peak RSS MiB | training wall time s |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        train = read_records(runs / m, "train")
        if not train:
            continue
        tps = statistics.median(r["tokens_per_s"] for r in train)
        st = statistics.median(r["step_time_s"] for r in train)
        peak = max(r.get("peak_mem_mb", float("nan")) for r in train)
        print(f"| {m} | {train[-1]['step']} | {tps:.1f} | {st:.1f} | {peak:.0f} | {train[-1]['elapsed_s']:.0f} |")


if __name__ == "__main__":
    main()
