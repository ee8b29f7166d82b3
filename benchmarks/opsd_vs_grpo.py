"""OPSD's headline claim measured: held-out accuracy against *generated tokens*, OPSD vs GRPO vs SFT.

The OPSD paper (arXiv 2601.18734) reports 4-12x better token efficiency than GRPO-style RL. Here,
on the bundled math task and from the base model of `benchmarks/opsd_math.py` (a byte-level Llama
that uses a reference solution but rarely solves alone), every method sees the same prompts in the
same order (hpd's sampler stream, `--batch` prompts per optimizer step, `--steps` steps, lr `--lr`):

- `grpo`: TRL's `GRPOTrainer`, reward = the math task's verifier (1.0 solved, 0.0 not:
  `hpd.apps.verifiers.VerifierReward`), `--generations` completions per prompt at temperature 1,
  `max_completion_length` = the OPSD rollouts' `regime.max_new_tokens`, TRL's defaults otherwise
  (loss `dapo`, beta 0: no reference model, group-scaled rewards, clip 0.2), the prompts as one user
  message under the chat template (as the OPSD rollouts and the scorer see them), its learning rate
  chosen from `--grpo-lrs` on the first seed (the best final held-out accuracy: generous to GRPO);
- the OPSD arms and SFT on the references of `opsd_math.METHODS` (hpd train, `regime.name=self`).

Each run is checkpointed at every `--points`-th of its steps and every checkpoint is scored (greedy,
`--n` held-out problems), so each method has a curve of accuracy against its cumulative generated
tokens. Table 1, mean ± std over `--seeds`: final accuracy (and the Wilson 95% interval of the
pooled verdicts), generated and teacher tokens, training CPU seconds, the generated tokens to reach
GRPO's final mean accuracy (linear interpolation on the mean curve; GRPO's tokens / the method's is
the "x fewer tokens" of the claim), and the accuracy at GRPO's first checkpoint's token count.
Table 2 (rollout drift: OPSD hpd on rollouts drifts from its privileged teacher): the plain arm
against rollout reuse under PPO clipping (`regime.epochs=2`), a 3x smaller lr, and an EMA teacher
(`opsd.teacher_weights=ema`), with accuracy and KL(teacher‖student) at the start and the end.

Cost, measured here on one shared core (per optimizer step of 16 prompts, CPU s): GRPO about 2.1
with the default 4 completions per prompt (213 s per 100-step run), OPSD on rollouts 0.7, SFT 0.25; a
held-out score of 200 problems about 6; the base model (300 steps) about 4 min. The default size
(100 steps, 3 seeds, GRPO's 3-rate grid on seed 0, 4 scored checkpoints per run, 4 drift arms on
one seed) therefore takes about an hour and a half of one core.

Runs and scores are kept under OUT (scores in OUT/scores.json, not in model directories), so a rerun
skips what has finished; an interrupted GRPO run starts again. TRL is needed (`pip install -e ".[bench]"`).

    OMP_NUM_THREADS=1 python benchmarks/opsd_vs_grpo.py --out runs/opsd-vs-grpo            # ~1.5 h of one core
    OMP_NUM_THREADS=1 python benchmarks/opsd_vs_grpo.py --out /tmp/ovg-smoke --smoke        # minutes: checks it runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from opsd_math import METHODS, TASK, accuracy, build_base, run_config, write_data  # noqa: E402

from hpd.apps.experiments import read_records, run_configs, run_slug  # noqa: E402
from hpd.files import atomic_write_text  # noqa: E402

ROLLOUT = "opsd hpd (rollouts)"
# Table 2: label -> (base method, extra overrides, lr factor)
DRIFT_ARMS: dict[str, tuple[str, list[str], float]] = {
    "hpd rollouts (plain)": (ROLLOUT, [], 1.0),
    "+ reuse under PPO clip (epochs=2)": (ROLLOUT, ["regime.epochs=2"], 1.0),
    "+ lr / 3": (ROLLOUT, [], 1 / 3),
    "+ EMA teacher (0.99)": (ROLLOUT, ["opsd.teacher_weights=ema", "opsd.ema_decay=0.99"], 1.0),
}
SIZES = {  # pretrain rows, train rows, base steps, steps, batch, generations, held-out n, seeds
    "default": dict(n_pretrain=6000, n_train=4000, base_steps=300, steps=100, batch=16, generations=4, n=200, seeds="0,1,2"),
    "smoke": dict(n_pretrain=300, n_train=200, base_steps=20, steps=4, batch=4, generations=2, n=8, seeds="0,1"),
}


# ------------------------------------------------------------------------------------------
# Training: hpd methods through `hpd train`, GRPO through TRL, both leaving checkpoints + a token log
# ------------------------------------------------------------------------------------------


def hpd_cfg(a, label: str, method: str, extra: list[str], lr: float, seed: int):
    every = max(a.steps // a.points, 1)
    log = math.gcd(every, 5)  # a record (tokens so far) at every checkpoint's step
    return run_config(a.out, method, a.steps, [*METHODS[method], f"optim.batch_size={a.batch}", *extra,
                                               f"save.every={every}", f"save.keep_last={a.points + 1}",
                                               f"log.every={log}", f"log.diagnostics_every={log}",
                                               f"regime.max_new_tokens={a.max_new_tokens}"],
                      lr, seed=seed, run_dir=a.out / "runs" / f"{run_slug(label)}-s{seed}")


def hpd_curve(run_dir: Path) -> list[tuple[int, int, Path]]:
    """(step, generated tokens so far, model dir) of every checkpoint of an hpd run."""
    recs = {r["step"]: r for r in read_records(run_dir)}
    out = []
    for ck in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(ck.name.split("-")[1])
        rec = recs.get(step) or max((r for s, r in recs.items() if s <= step), key=lambda r: r["step"])
        out.append((step, int(rec["generated_tokens_total"]), ck / "model"))
    return out


def train_grpo(a, run_dir: Path, seed: int, lr: float) -> None:
    """TRL GRPO from the base model on the same prompt stream; steps.jsonl logs tokens and CPU per step."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hpd.apps.tasks import get_task
    from hpd.apps.verifiers import TaskVerifier, VerifierReward
    from hpd.data.order import EpochSampler

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = hpd_cfg(a, "grpo", ROLLOUT, [], lr, seed)  # the optimizer settings of the hpd runs
    o = cfg.optim
    rows = [json.loads(line) for line in (a.out / "data" / "train.jsonl").read_text().splitlines()]
    sampler = EpochSampler(len(rows), a.batch, seed=seed)  # hpd's order of prompts
    stream = [rows[i] for _ in range(a.steps) for i in next(sampler)]
    reward = VerifierReward(TaskVerifier(get_task(TASK)))
    base = a.out / "base" / "final"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base))
    # GRPO must see the prompts exactly as hpd's rollouts and the scorer do: one user message under the
    # model's chat template (TRL applies it to conversational prompts). A plain string would be
    # tokenized without the template, a prompt format the base model was never trained on.
    def prompt_of(text: str):
        return [{"role": "user", "content": text}] if tok.chat_template else text

    data = Dataset.from_list([{"prompt": prompt_of(r["prompt"]), "answer": r["answer"], "meta": r["meta"]} for r in stream])
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "steps.jsonl").open("w")

    class Tokens(TrainerCallback):
        cpu = wall = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.wall += time.perf_counter() - self.t0
            self.cpu += time.process_time() - self.c0
            log.write(json.dumps({"step": state.global_step, "generated_tokens_total": reward.generated_tokens,
                                  "cpu_s": self.cpu, "elapsed_s": self.wall}) + "\n")
            log.flush()

    targs = GRPOConfig(
        output_dir=str(run_dir), max_steps=a.steps, per_device_train_batch_size=a.batch * a.generations,
        gradient_accumulation_steps=1, num_generations=a.generations, max_completion_length=a.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, shuffle_dataset=False,
        learning_rate=lr, lr_scheduler_type="constant_with_warmup", warmup_steps=int(round(o.warmup_ratio * a.steps)),
        weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, max_grad_norm=o.max_grad_norm,
        seed=seed, data_seed=seed, save_strategy="steps", save_steps=max(a.steps // a.points, 1), save_only_model=True,
        save_total_limit=None, logging_steps=max(a.steps // 10, 1), report_to="none", use_cpu=True, bf16=False,
        fp16=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=targs, train_dataset=data, processing_class=tok,
                          callbacks=[Tokens()])
    trainer.train()
    log.close()
    trainer.save_model(str(run_dir / "final"))
    tok.save_pretrained(str(run_dir / "final"))


def grpo_curve(run_dir: Path) -> list[tuple[int, int, Path]]:
    recs = {r["step"]: r for r in (json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines())}
    out = []
    for ck in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(ck.name.split("-")[1])
        out.append((step, int(recs[step]["generated_tokens_total"]), ck))
    return out


# ------------------------------------------------------------------------------------------
# Scores (cached in OUT/scores.json by model directory) and one run's summary
# ------------------------------------------------------------------------------------------


class Scores:
    def __init__(self, path: Path, n: int):
        self.path, self.n = path, n
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, model_dir: Path, privileged: bool = False) -> dict:
        key = f"{model_dir}|{'privileged' if privileged else 'plain'}|{self.n}"
        if key not in self.data:
            self.data[key] = accuracy(model_dir, privileged=privileged, n=self.n)
            atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return self.data[key]


def summarize(scores: Scores, run_dir: Path, kind: str, base_acc: float) -> dict:
    """One run: curve [(tokens, accuracy)], final accuracy and verdicts, tokens, teacher tokens, CPU s, KL."""
    if kind == "grpo":
        curve = grpo_curve(run_dir)
        last = json.loads((run_dir / "steps.jsonl").read_text().splitlines()[-1])
        teacher, kls = 0, []
    else:
        curve = hpd_curve(run_dir)
        recs = read_records(run_dir)
        last, teacher = recs[-1], int(recs[-1]["teacher_tokens_total"])
        # KL(teacher || student) on the training responses; a reused rollout batch logs it once, at the rollout
        kls = [r.get("kl", r.get("rollout_kl")) for r in recs if r.get("kl", r.get("rollout_kl")) is not None]
    points = [(0, base_acc)] + [(tok, scores(d)["accuracy"]) for _, tok, d in curve]
    final = scores(curve[-1][2])
    return {"curve": points, "acc": final["accuracy"], "correct": final["correct"], "n": final["n"],
            "tokens": int(last["generated_tokens_total"]), "teacher": teacher, "cpu": float(last["cpu_s"]),
            "kl": (statistics.mean(kls[:4]), statistics.mean(kls[-4:])) if kls else None}


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first token count where the piecewise-linear curve reaches `target` (None if never)."""
    for (t0, y0), (t1, y1) in zip(curve, curve[1:]):
        if y1 >= target:
            return t0 if y0 >= target else t0 + (target - y0) / (y1 - y0) * (t1 - t0)
    return None


def accuracy_at(curve: list[tuple[float, float]], tokens: float) -> float:
    """The curve's accuracy at `tokens` (linear between points, flat after the last)."""
    for (t0, y0), (t1, y1) in zip(curve, curve[1:]):
        if t0 <= tokens <= t1:
            return y0 if t1 == t0 else y0 + (tokens - t0) / (t1 - t0) * (y1 - y0)
    return curve[-1][1]


def mean_curve(runs: list[dict]) -> list[tuple[float, float]]:
    """Mean tokens and mean accuracy per checkpoint index over seeds."""
    k = min(len(r["curve"]) for r in runs)
    return [(statistics.mean(r["curve"][i][0] for r in runs), statistics.mean(r["curve"][i][1] for r in runs)) for i in range(k)]


def ms(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) < 2:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def wilson(correct: int, n: int) -> str:
    from hpd.apps.evaluate import wilson_interval

    lo, hi = wilson_interval(correct, n)
    return f"{100 * lo:.1f}-{100 * hi:.1f}"


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/opsd-vs-grpo"))
    ap.add_argument("--smoke", action="store_true", help="a tiny size that checks the whole pipeline in minutes")
    for k, v in SIZES["default"].items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v} (smoke {SIZES['smoke'][k]})")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of every hpd method")
    ap.add_argument("--grpo-lrs", default="1e-3,1e-4,1e-5",
                    help="GRPO's learning-rate grid: each rate runs on the first seed, the best final accuracy gets the "
                         "other seeds (tuned on the held-out problems: generous to GRPO)")
    ap.add_argument("--points", type=int, default=4, help="checkpoints scored per run (the accuracy-vs-tokens curve)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="rollout / GRPO completion budget")
    ap.add_argument("--methods", default="grpo," + ",".join(METHODS), help="comma-separated: grpo and opsd_math labels")
    ap.add_argument("--drift", default=",".join(DRIFT_ARMS), help="comma-separated table-2 arms ('' for none)")
    ap.add_argument("--drift-seeds", default=None, help="seeds of table 2 (default: the first of --seeds)")
    a = ap.parse_args(argv)
    size = SIZES["smoke" if a.smoke else "default"]
    for k, v in size.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    seeds = [int(s) for s in a.seeds.split(",")]
    drift_seeds = [int(s) for s in (a.drift_seeds or str(seeds[0])).split(",")]
    methods = [m for m in a.methods.split(",") if m]
    drift = [d for d in a.drift.split(",") if d]
    for m in methods:
        if m != "grpo" and m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; use grpo or one of {', '.join(METHODS)}")
    t_start = time.perf_counter()

    write_data(a.out, a.n_pretrain, a.n_train)
    base = build_base(a.out, [f"max_steps={a.base_steps}", f"save.every={a.base_steps}"])
    scores = Scores(a.out / "scores.json", a.n)
    before, teacher_acc = scores(base), scores(base, privileged=True)

    grpo_lrs = [float(x) for x in a.grpo_lrs.split(",") if x.strip()]

    def grpo_dir(lr: float, s: int) -> Path:
        return a.out / "runs" / f"grpo-lr{lr:g}-s{s}"

    def train(label: str, kind: str, s: int, run_dir: Path, cfg, lr: float | None = None) -> None:
        if (run_dir / "final" / "config.json").is_file():
            return
        print(f"[opsd-vs-grpo] train {label} seed {s} -> {run_dir}", flush=True)
        if kind == "grpo":
            train_grpo(a, run_dir, s, lr)
        else:
            run_configs([cfg], jobs=1, labels=[f"{label} s{s}"], threads_per_job=1, progress=False)

    # GRPO's rate: the grid on the first seed, scored on its final checkpoint
    grpo_lr, grpo_grid = None, {}
    if "grpo" in methods:
        for lr in grpo_lrs:
            train(f"grpo lr {lr:g}", "grpo", seeds[0], grpo_dir(lr, seeds[0]), None, lr)
            grpo_grid[lr] = summarize(scores, grpo_dir(lr, seeds[0]), "grpo", before["accuracy"])
        grpo_lr = max(grpo_lrs, key=lambda lr: (grpo_grid[lr]["acc"], -grpo_grid[lr]["tokens"]))

    # table 1 runs, then table 2's (the plain drift arm is table 1's hpd-rollouts run when seeds agree)
    jobs: list[tuple[str, str, int, Path, object]] = []  # (row label, kind, seed, run dir, hpd cfg or None)
    for m in methods:
        for s in seeds:
            if m == "grpo":
                jobs.append((f"grpo (lr {grpo_lr:g})", "grpo", s, grpo_dir(grpo_lr, s), None))
            else:
                cfg = hpd_cfg(a, m, m, [], a.lr, s)
                jobs.append((m, "hpd", s, Path(cfg.output_dir), cfg))
    drift_jobs = []
    for d in drift:
        method, extra, f = DRIFT_ARMS[d]
        for s in drift_seeds:
            label = method if (not extra and f == 1.0) else d
            cfg = hpd_cfg(a, label, method, extra, a.lr * f, s)
            drift_jobs.append((d, "hpd", s, Path(cfg.output_dir), cfg))
    seen = set()
    for label, kind, s, run_dir, cfg in jobs + drift_jobs:
        if run_dir not in seen:
            seen.add(run_dir)
            train(label, kind, s, run_dir, cfg, grpo_lr)

    res: dict[str, list[dict]] = {}
    for label, kind, s, run_dir, _ in jobs:
        res.setdefault(label, []).append(summarize(scores, run_dir, kind, before["accuracy"]))
    dres: dict[str, list[dict]] = {}
    for label, kind, s, run_dir, _ in drift_jobs:
        dres.setdefault(label, []).append(summarize(scores, run_dir, kind, before["accuracy"]))

    target = first_tokens = None
    grpo_label = f"grpo (lr {grpo_lr:g})" if grpo_lr is not None else None
    if grpo_label in res:
        g = mean_curve(res[grpo_label])
        target, first_tokens = g[-1][1], g[1][0]
        grpo_tokens = tokens_to_reach(g, target)
    lines = [
        f"Base model: held-out accuracy {100 * before['accuracy']:.1f}% alone, {100 * teacher_acc['accuracy']:.1f}% with the "
        f"reference in its prompt (the privileged teacher); n={a.n}, greedy. {a.steps} steps of {a.batch} prompts, lr {a.lr:g} "
        f"(GRPO: its own rate, below), rollouts of at most {a.max_new_tokens} tokens at temperature 1; GRPO {a.generations} "
        f"completions per prompt. Seeds {a.seeds} (mean ± std).",
    ]
    if grpo_grid:
        lines += ["", f"GRPO's learning-rate grid (seed {seeds[0]}, final checkpoint): " + ", ".join(
            f"lr {lr:g}: {100 * r['acc']:.1f}% (best on the curve {100 * max(y for _, y in r['curve'][1:]):.1f}%)"
            for lr, r in grpo_grid.items()) + f"; chosen {grpo_lr:g}."]
    if res:
        lines += [
            "",
            "| method | accuracy % | 95% CI (pooled) | generated tokens | teacher tokens | train CPU s | "
            + (f"tokens to reach GRPO's final {100 * target:.1f}% (GRPO / method) | accuracy % at {first_tokens:.0f} tokens |"
               if target is not None else "|"),
            "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if target is not None else ""),
        ]
    for label, runs in res.items():
        row = (f"| {label} | {ms([100 * r['acc'] for r in runs])} | {wilson(sum(r['correct'] for r in runs), sum(r['n'] for r in runs))} "
               f"| {ms([r['tokens'] for r in runs], '{:.0f}')} | {ms([r['teacher'] for r in runs], '{:.0f}')} "
               f"| {ms([r['cpu'] for r in runs], '{:.0f}')} |")
        if target is not None:
            c = mean_curve(runs)
            reach = tokens_to_reach(c, target)
            if reach is None:
                cell = f"not reached (best {100 * max(y for _, y in c):.1f}%)"
            elif reach == 0:
                cell = "0 (no generation)" if c[-1][0] == 0 else "0 (the base model already)"
            else:
                cell = f"{reach:.0f} ({grpo_tokens / reach:.1f}x)" if grpo_tokens else f"{reach:.0f}"
            row += f" {cell} | {100 * accuracy_at(c, first_tokens):.1f} |"
        lines.append(row)
    if dres:
        lines += [
            "",
            f"Rollout drift (OPSD hpd on rollouts; seeds {','.join(map(str, drift_seeds))}): KL(teacher‖student) on the "
            "training responses, mean of the first and of the last 4 logged values.",
            "",
            "| arm | accuracy % | generated tokens | train CPU s | KL start | KL end |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, runs in dres.items():
            kl0 = [r["kl"][0] for r in runs if r["kl"]]
            kl1 = [r["kl"][1] for r in runs if r["kl"]]
            lines.append(f"| {label} | {ms([100 * r['acc'] for r in runs])} | {ms([r['tokens'] for r in runs], '{:.0f}')} "
                         f"| {ms([r['cpu'] for r in runs], '{:.0f}')} | {ms(kl0, '{:.2f}') if kl0 else '-'} "
                         f"| {ms(kl1, '{:.2f}') if kl1 else '-'} |")
    lines += ["", f"(this invocation: {time.perf_counter() - t_start:.0f} s wall, runs reused included)"]
    text = "\n".join(lines)
    atomic_write_text(a.out / "results.md", text + "\n")
    atomic_write_text(a.out / "results.json", json.dumps({"table": res, "drift": dres, "target": target}, default=str))
    print(text)


if __name__ == "__main__":
    main()
