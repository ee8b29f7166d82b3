"""On-policy distillation with and without rollout reuse: cost (CPU s, generated tokens) per accuracy.

From the shipped pretrained student (`hpd/assets/students/llama-2x96`) and the bundled teacher, on
the bundled tasks (math, code, dialogue; gold prompts), each arm trains the same number of optimizer
steps on the student's own rollouts (`regime.name=student`) with `orkl` and `hpd`:

- `M=1 E=1`: a fresh rollout batch every step, used once (the plain on-policy step);
- `M x E > 1`: one rollout batch of M x batch prompts feeds M mini-batches x E epochs, the
  objective's weights fixed at rollout time and PPO-clipped by the ratio to the rollout policy
  (`regime.minibatches`, `regime.epochs`, README "Reusing rollouts"). At an equal number of steps
  an arm samples 1/E of the plain arm's tokens (M only batches the sampling: as many tokens).

It prints (and writes to OUT/results.md) per arm: rollout batches, generated tokens, the training
CPU seconds (`cpu_s` of metrics.jsonl, evaluation excluded), greedy test accuracy per task and its
mean, the change against the start, the CPU seconds and generated tokens per accuracy point gained,
and the mean clip fraction and approximate KL between old and current policy. Runs and scores are
kept under OUT, so a rerun skips what has finished.

    python benchmarks/onpolicy_reuse.py --out runs/onpolicy-reuse --seeds 0,1,2 --lr 3.3e-4   # ~10 min per seed, one core
    python benchmarks/onpolicy_reuse.py --out /tmp/reuse-smoke --smoke       # seconds: checks it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpd.apps.bench import TRAIN_SETTINGS, BenchSettings, gold_data, heldout_data, resolve_start, score_model  # noqa: E402
from hpd.apps.demo import BUNDLED_TEACHER, TASKS  # noqa: E402
from hpd.files import atomic_write_text  # noqa: E402

# (objective, minibatches M, epochs E)
# E > 1 is what saves generation (each rollout trains E times); M > 1 with E = 1 samples as many
# tokens, in bigger batches, from a staler policy.
ARMS = [("orkl", 1, 1), ("orkl", 2, 2), ("orkl", 1, 4), ("hpd", 1, 1), ("hpd", 2, 2), ("hpd", 1, 4)]
SMOKE_ARMS = [("orkl", 1, 1), ("hpd", 2, 2)]


def parse_arms(text: str) -> list[tuple[str, int, int]]:
    """`orkl:1:1,hpd:2:2` -> [("orkl", 1, 1), ("hpd", 2, 2)]."""
    arms = []
    for part in text.split(","):
        name, m, e = part.split(":")
        arms.append((name, int(m), int(e)))
    return arms


def score(model_dir: Path, test: Path, path: Path) -> dict:
    """Greedy per-task accuracy on the test rows, cached in `path`."""
    if not path.is_file():
        res = score_model(model_dir, str(test), "task", None)
        per_task: dict[str, list[bool]] = {}
        for task, ok in zip(res["tasks"], res["verdicts"]):
            per_task.setdefault(task, []).append(ok)
        acc = {t: 100 * sum(v) / len(v) for t, v in per_task.items()}
        acc["mean"] = statistics.mean(acc[t] for t in per_task)
        atomic_write_text(path, json.dumps(acc))
    return json.loads(path.read_text())


def train_arm(run_dir: Path, objective: str, M: int, E: int, *, train: Path, start_overrides, steps: int, lr: float,
              seed: int, extra: list[str]) -> list[dict]:
    """Train one arm (or reuse its finished run); its train records."""
    import hpd
    from hpd.config import load_config

    if not (run_dir / "final" / "config.json").is_file():
        overrides = [*TRAIN_SETTINGS, *start_overrides, f"output_dir={run_dir}", f"teacher.path={BUNDLED_TEACHER}",
                     f"data.train={train}", "data.eval=null", f"objective.name={objective}", "regime.name=student",
                     f"regime.minibatches={M}", f"regime.epochs={E}", f"max_steps={steps}", f"seed={seed}",
                     f"optim.lr={lr:g}", "log.every=1", "log.eval_every=0", "log.progress=false", "save.every=0",
                     "resume=auto", *extra]
        hpd.train(load_config(None, overrides))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == "train"]


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.mean(values) if values else None


def arm_row(label: str, per_seed: list[dict], base: dict, updates_per_batch: int) -> dict:
    """One arm's table row: accuracy, tokens and CPU seconds averaged over its seeds.

    `per_seed` holds, per seed, the train records (`recs`), the test accuracy by task (`acc`), the
    mean clip fraction (`clip`) and the mean approximate KL (`kl`); `base` is the start's accuracy.
    The cost per accuracy point is left empty where the arm gained nothing.
    """
    acc = {t: statistics.mean(p["acc"][t] for p in per_seed) for t in per_seed[0]["acc"]}
    gain = acc["mean"] - base["mean"]
    generated = statistics.mean(p["recs"][-1]["generated_tokens_total"] for p in per_seed)
    cpu_s = statistics.mean(p["recs"][-1]["cpu_s"] for p in per_seed)
    clips = [p["clip"] for p in per_seed if p["clip"] is not None]
    kls = [p["kl"] for p in per_seed if p["kl"] is not None]
    steps = len(per_seed[0]["recs"])
    return {
        "arm": label, "steps": steps, "rollouts": -(-steps // updates_per_batch),
        "generated": generated, "cpu_s": cpu_s, "acc": acc, "gain": gain,
        "std": statistics.stdev(p["acc"]["mean"] for p in per_seed) if len(per_seed) > 1 else None,
        "cpu_per_pt": cpu_s / gain if gain > 0 else None,
        "gen_per_pt": generated / gain if gain > 0 else None,
        "clip": statistics.mean(clips) if clips else None, "kl": statistics.mean(kls) if kls else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per arm (same for every arm)")
    ap.add_argument("--n-eval", type=int, default=100, help="test problems per task")
    ap.add_argument("--train-per-task", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per optimizer step (optim.batch_size)")
    ap.add_argument("--lr", type=float, default=None, help="default: the pretrained start's base rate")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; each arm runs once per seed and the table "
                    "gives means (accuracy: mean ± std over seeds)")
    ap.add_argument("--arms", type=parse_arms, default=None, help="objective:M:E,... (default: orkl and hpd at 1:1, 2:2, 1:4)")
    ap.add_argument("--smoke", action="store_true", help="a tiny setting that only checks the script runs")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    if args.smoke:
        args.steps, args.n_eval, args.train_per_task, args.batch_size = 4, 3, 40, 4
    arms = args.arms or (SMOKE_ARMS if args.smoke else ARMS)
    out = args.out
    settings = BenchSettings(out_dir=out, train_per_task=args.train_per_task, n_val=max(args.n_eval // 10, 1))
    start = resolve_start("pretrained", settings)
    lr = args.lr if args.lr is not None else start.lr
    train, _ = gold_data(out / "data", list(TASKS), settings)
    test = heldout_data(out / "data", list(TASKS), args.n_eval, "tasks")
    extra = [f"optim.batch_size={args.batch_size}"] + (["regime.max_new_tokens=16", "data.max_length=96"] if args.smoke else [])

    base = score(start.model, test, out / "eval-start.json")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    rows = []
    for objective, M, E in arms:
        per_seed = []
        for seed in seeds:
            run_dir = out / "runs" / f"{objective}-m{M}-e{E}-s{seed}"
            recs = train_arm(run_dir, objective, M, E, train=train, start_overrides=start.overrides, steps=args.steps,
                             lr=lr, seed=seed, extra=extra)
            acc = score(run_dir / "final", test, run_dir / "eval-test.json")
            clip = [(r.get("clip_frac_low") or 0) + (r.get("clip_frac_high") or 0) + (r.get("clip_frac_dual") or 0)
                    for r in recs if "clip_frac_low" in r]
            per_seed.append({"recs": recs, "acc": acc, "clip": statistics.mean(clip) if clip else None,
                             "kl": _mean(recs, "approx_kl")})
        rows.append(arm_row(f"{objective} M={M} E={E}", per_seed, base, M * E))

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    tasks = [t for t in base if t != "mean"]
    head = ["arm", "steps", "rollout batches", "generated tokens", "CPU s", *tasks, "mean", "std (seeds)", "vs start",
            "CPU s / pt", "gen. tokens / pt", "clip frac", "approx KL"]
    lines = [f"Start: {start.model} (mean {base['mean']:.1f}: " + ", ".join(f"{t} {base[t]:.1f}" for t in tasks) +
             f"); {args.steps} steps of {args.batch_size} prompts, lr {lr:g}, seeds {','.join(map(str, seeds))} (means "
             "over seeds: tokens, CPU s, accuracy), "
             f"{args.n_eval} test problems per task, greedy. '/ pt': per accuracy point gained (- if none).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arm"], str(r["steps"]), str(r["rollouts"]), f"{r['generated']:.0f}", f"{r['cpu_s']:.1f}",
                 *(f"{r['acc'][t]:.1f}" for t in tasks), f"{r['acc']['mean']:.1f}", f(r["std"], ".1f"), f"{r['gain']:+.1f}",
                 f(r["cpu_per_pt"], ".1f"), f(r["gen_per_pt"], ".0f"), f(r["clip"], ".3f"), f(r["kl"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()
