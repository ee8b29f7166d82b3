"""hpd against TRL's GKD trainer on the same models, data, batch, steps and optimizer, in one run.

Methods (each trains in its own subprocess, one torch thread, so that its memory is its own):

- `gkd l0`   TRL `GKDTrainer`, lmbda=0: off-policy, the dataset's responses; TRL's default loss
             (generalized JSD, beta=0.5) over the full vocabulary of both models' logits.
- `gkd l0.5` the same with lmbda=0.5: on about half of the steps the student samples the responses
             (TRL's default sampling temperature 0.9, `regime.max_new_tokens` new tokens).
- `hpd online`   `hpd train`, objective hpd, dataset regime (HPD's own cheap on-policy sample
             y_hat), the teacher run forward at each step.
- `hpd cached`   the same reading a top-K teacher cache built once (`hpd cache-teacher`).
- `sft`      plain SFT of the student on the same data (the floor of any step).

Same for all: the bundled teacher (`hpd/assets/teacher`) and the demo's default student (same
initial weights: both trainers get the model `hpd.training.setup.load_models` builds), the demo's
training file, batch size, learning rate, warm-up + cosine schedule to 10%, AdamW, clipping, and
the same batches in the same order (TRL's dataset is our sampler's stream, read sequentially).

Measured:
- step time: median per step after `--warmup` steps (wall and process CPU seconds); tokens/s;
  TRL's step is timed from `on_step_begin` to `on_step_end` (its collation falls outside, ours
  inside: conservative for hpd);
- memory: peak resident set of the worker during training (the peak is reset after set-up with
  /proc/self/clear_refs), and how far it rose above the set-up (models, data, optimizer);
- held-out accuracy of the bundled tasks (greedy, real verifiers, `--n-eval` problems per task)
  at every quarter of training, and the training time (wall and CPU) to reach the final accuracy
  of GKD lambda 0.5.

Runs live in `OUT/<method>/` and are reused when finished (the accuracy of each checkpoint is
cached too), so an interrupted benchmark goes on where it stopped. Tables go to stdout and
`OUT/results.md`, figures to `OUT/results.json`. TRL is needed only here:

    pip install trl==1.16.0                   # or: pip install -e ".[bench]"
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --out runs/vs-trl --steps 400 --n-eval 100
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --out /tmp/vs-trl-smoke --steps 8 --per-task 64 --n-eval 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("sft", "hpd online", "hpd cached", "gkd l0", "gkd l0.5")


def slug(method: str) -> str:
    return method.replace(" ", "-")


# ------------------------------------------------------------------------------------------
# Memory of this process (Linux): the peak is reset after set-up so that it is training's own.
# ------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the peak resident set (VmHWM) to the current one; returns the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss() -> float:
    return _status_mb("VmHWM")


# ------------------------------------------------------------------------------------------
# Configs: one hpd config per method; TRL reads the same one for models, data and optimizer.
# ------------------------------------------------------------------------------------------


def method_config(args, method: str):
    from hpd.config import load_config
    from hpd.apps.demo import student_config

    save_every = max(args.steps // 4, 1)
    extra = ["log.every=1", "log.diagnostics_every=1000000", "log.eval_every=0", f"save.every={save_every}",
             "save.keep_last=8", f"seed={args.seed}"]
    objective = "sft" if method == "sft" else "hpd"
    if method == "sft":
        extra.append("teacher.path=none")
    if args.device == "cuda":  # bf16: the teacher's weights, the student's autocast (fp32 master weights)
        extra += ["teacher.dtype=bfloat16", "optim.mixed_precision=bf16"]
    if method == "hpd cached":
        extra.append(f"teacher.cache={args.out / f'cache-k{args.top_k}'}")
    if args.recipe == "bundled":
        train, eval_ = args.out / "data" / "train.jsonl", args.out / "data" / "eval.jsonl"
        return student_config(args.out / slug(method), args.teacher, train, eval_, objective=objective,
                              steps=args.steps, seed=args.seed, extra=extra)
    # A real model: every method starts from the same saved student (the recipe's layer subset of
    # the teacher, written once by `initial_student`), so the cached run never loads the teacher.
    return load_config(args.config, [f"output_dir={args.out / slug(method)}", f"max_steps={args.steps}",
                                     f"objective.name={objective}", f"data.train={args.data}", "data.eval=null",
                                     f"student.path={args.out / 'student0'}", "student.init_from_teacher=null",
                                     *extra])


def initial_student(args) -> None:
    """The real-model recipe's initial student, saved once as a plain HF directory."""
    from hpd.config import load_config
    from hpd.models.from_teacher import save_student_from_teacher

    s = load_config(args.config).student
    save_student_from_teacher(str(args.teacher), s.init_from_teacher, args.out / "student0", dtype=s.dtype)


# ------------------------------------------------------------------------------------------
# Workers (one subprocess per method)
# ------------------------------------------------------------------------------------------


def run_hpd(args, method: str) -> dict:
    from hpd.training.trainer import Trainer

    trainer = Trainer(method_config(args, method))
    rss0 = reset_peak_rss()
    _reset_peak_gpu(args)
    trainer.run()
    return {"setup_rss_mb": rss0, "peak_rss_mb": peak_rss(), **_peak_gpu(args)}


def _reset_peak_gpu(args) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_gpu(args) -> dict:
    """Peak allocated GPU memory since `_reset_peak_gpu` (after set-up: models, data), in MiB."""
    if args.device != "cuda":
        return {}
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def run_gkd(args, method: str) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from hpd.objectives import IGNORE_INDEX
    from hpd.data.order import EpochSampler
    from hpd.data.collate import batch_for_generation, build_batch
    from hpd.training.setup import load_data, load_models

    cfg = method_config(args, "hpd online")  # models, data and optimizer settings of the hpd runs
    student, teacher, tok, _ = load_models(cfg)
    examples, _, _ = load_data(cfg, tok)
    o = cfg.optim
    # Our sampler's stream of indices, read in order: the same batches as the hpd runs.
    sampler = EpochSampler(len(examples), o.batch_size, seed=cfg.seed)
    stream = [i for _ in range(args.steps) for i in next(sampler)]
    pad = tok.pad_token_id

    def collate(rows: list[dict]) -> dict:
        ex = [examples[r["i"]] for r in rows]
        b = build_batch([e.prompt_ids for e in ex], [e.completion_ids for e in ex], pad_id=pad)
        # HF's convention: labels aligned with input_ids, shifted inside the loss.
        labels = torch.full_like(b["labels"], IGNORE_INDEX)
        labels[:, 1:] = b["labels"][:, :-1]
        prompts, prompt_mask = batch_for_generation([e.prompt_ids for e in ex], pad)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels,
                "prompts": prompts, "prompt_attention_mask": prompt_mask}

    run_dir = args.out / slug(method)
    steps_log = (run_dir / "steps.jsonl").open("w")

    class Timed(GKDTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # GKD replaced the labels by the student's samples on on-policy steps: count those.
            self._tokens = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            return loss

    class StepTimer(TrainerCallback):
        wall = cpu = 0.0

        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            dt, dc = time.perf_counter() - self.t0, time.process_time() - self.c0
            self.wall += dt
            self.cpu += dc
            steps_log.write(json.dumps({"step": state.global_step, "step_time_s": dt, "step_cpu_s": dc,
                                        "tokens": trainer._tokens, "elapsed_s": self.wall, "cpu_s": self.cpu}) + "\n")
            steps_log.flush()

    lmbda = float(method.split("l")[-1])
    targs = GKDConfig(
        output_dir=str(run_dir), max_steps=args.steps, per_device_train_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum, learning_rate=o.lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, max_grad_norm=o.max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio},
        warmup_steps=int(round(o.warmup_ratio * args.steps)), seed=cfg.seed, data_seed=cfg.seed,
        lmbda=lmbda, max_new_tokens=cfg.regime.max_new_tokens, max_length=cfg.data.max_length,
        save_strategy="steps", save_steps=max(args.steps // 4, 1), save_only_model=True, save_total_limit=None,
        logging_steps=max(args.steps // 20, 1), report_to="none", use_cpu=args.device == "cpu",
        bf16=args.device == "cuda", fp16=False,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Timed(model=student, teacher_model=teacher, args=targs, data_collator=collate,
                    train_dataset=Dataset.from_dict({"i": stream}), processing_class=tok, callbacks=[StepTimer()])
    trainer._tokens = 0
    rss0 = reset_peak_rss()
    _reset_peak_gpu(args)
    trainer.train()
    out = {"setup_rss_mb": rss0, "peak_rss_mb": peak_rss(), **_peak_gpu(args)}
    steps_log.close()
    trainer.save_model(str(run_dir / "final"))
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    method = args.worker
    res = (run_gkd if method.startswith("gkd") else run_hpd)(args, method)
    (args.out / slug(method) / "worker.json").write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------
# The parent: data, cache, workers, accuracy at checkpoints, tables
# ------------------------------------------------------------------------------------------


def step_records(run_dir: Path) -> list[dict]:
    """Per-step {step, step_time_s, step_cpu_s, tokens, elapsed_s, cpu_s} of either trainer."""
    if (run_dir / "steps.jsonl").is_file():
        return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
    from hpd.apps.experiments import read_records

    recs, prev = [], 0.0
    for r in read_records(run_dir):
        if r.get("step_time_s"):
            recs.append({**r, "step_cpu_s": r["cpu_s"] - prev})
            prev = r["cpu_s"]
    return recs


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """{step: model directory} of every saved checkpoint of either trainer."""
    found = {}
    for d in (run_dir / "checkpoints").glob("step-*"):
        if (d / "model" / "config.json").is_file():
            found[int(d.name.split("-")[1])] = d / "model"
    for d in run_dir.glob("checkpoint-*"):
        if (d / "config.json").is_file():
            found[int(d.name.split("-")[1])] = d
    return dict(sorted(found.items()))


def accuracy(model_dir: Path, cache: Path, args) -> dict:
    from hpd.apps.demo import TASKS
    from hpd.apps.experiments import evaluate_on_tasks

    if not cache.is_file():
        cache.write_text(json.dumps(evaluate_on_tasks(model_dir, list(TASKS), n=args.n_eval, seed=args.seed)))
    acc = json.loads(cache.read_text())
    acc["mean"] = sum(v["accuracy"] for v in acc.values()) / len(acc)
    return acc


def summarize(args, method: str) -> dict:
    run_dir = args.out / slug(method)
    recs = step_records(run_dir)
    timed = [r for r in recs if r["step"] > args.warmup] or recs
    at = {r["step"]: r for r in recs}
    row = {"method": method, "steps": len(recs),
           "step_s": statistics.median(r["step_time_s"] for r in timed),
           "step_cpu_s": statistics.median(r["step_cpu_s"] for r in timed),
           "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
           "train_s": recs[-1]["elapsed_s"], "train_cpu_s": recs[-1]["cpu_s"],
           **json.loads((run_dir / "worker.json").read_text()), "curve": []}
    if args.n_eval:
        for step, model_dir in checkpoints(run_dir).items():
            acc = accuracy(model_dir, run_dir / f"accuracy-step{step}-n{args.n_eval}.json", args)
            row["curve"].append({"step": step, "train_s": at[step]["elapsed_s"], "train_cpu_s": at[step]["cpu_s"],
                                 "accuracy": acc})
    return row


def time_to(row: dict, target: float) -> dict | None:
    """The first checkpoint of `row` whose mean accuracy reaches `target`."""
    return next((c for c in row["curve"] if c["accuracy"]["mean"] >= target - 1e-12), None)


def tables(args, rows: list[dict]) -> str:
    from hpd.apps.demo import TASKS

    by = {r["method"]: r for r in rows}
    ref = by.get("gkd l0")
    lines = [f"{args.steps} steps, batch {method_config(args, 'sft').optim.batch_size}, seed {args.seed}, "
             f"one torch thread per run, median over steps {args.warmup + 1}..{args.steps}; "
             f"x gkd l0 = gkd l0's median step time / the method's (higher is faster); "
             "memory: peak resident set during training, and its rise above the set-up.", "",
             "| method | step s | step CPU s | tokens/s | x gkd l0 (speed) | peak RSS MiB | above set-up MiB | "
             "% of gkd l0 (above set-up) | train wall s | train CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rise = r["peak_rss_mb"] - r["setup_rss_mb"]
        speed = f"{ref['step_s'] / r['step_s']:.2f}" if ref else "-"
        mem = f"{100 * rise / (ref['peak_rss_mb'] - ref['setup_rss_mb']):.0f}%" if ref else "-"
        lines.append(f"| {r['method']} | {r['step_s']:.3f} | {r['step_cpu_s']:.3f} | {r['tokens_per_s']:.0f} | {speed} | "
                     f"{r['peak_rss_mb']:.0f} | {rise:.0f} | {mem} | {r['train_s']:.0f} | {r['train_cpu_s']:.0f} |")
    if not args.n_eval:
        return "\n".join(lines)
    steps = sorted({c["step"] for r in rows for c in r["curve"]})
    lines += ["", f"Held-out mean accuracy over {', '.join(TASKS)} ({args.n_eval} problems per task, greedy) "
              "at each checkpoint, with the training wall seconds to reach it:", "",
              "| method | " + " | ".join(f"step {s}" for s in steps) + " | final per task |",
              "|---|" + "---:|" * (len(steps) + 1)]
    for r in rows:
        cells = {c["step"]: f"{100 * c['accuracy']['mean']:.1f}% ({c['train_s']:.0f} s)" for c in r["curve"]}
        last = r["curve"][-1]["accuracy"] if r["curve"] else {}
        per = ", ".join(f"{t} {100 * last[t]['accuracy']:.0f}%" for t in TASKS if t in last)
        lines.append(f"| {r['method']} | " + " | ".join(cells.get(s, "-") for s in steps) + f" | {per} |")
    mixed = by.get("gkd l0.5")
    if mixed and mixed["curve"]:
        target = mixed["curve"][-1]["accuracy"]["mean"]
        hit_ref = time_to(mixed, target)
        lines += ["", f"Time to GKD lambda 0.5's final accuracy ({100 * target:.1f}%): the first checkpoint that "
                  "reaches it (checkpoints every quarter of training, so times are upper bounds).", "",
                  "| method | step | train wall s | train CPU s | x less wall time than gkd l0.5 |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            hit = time_to(r, target)
            if hit is None:
                lines.append(f"| {r['method']} | not reached in {args.steps} steps | - | - | - |")
            else:
                lines.append(f"| {r['method']} | {hit['step']} | {hit['train_s']:.0f} | {hit['train_cpu_s']:.0f} | "
                             f"{hit_ref['train_s'] / hit['train_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vs-trl"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--per-task", type=int, default=4000, help="training problems per task (the demo's 4000)")
    ap.add_argument("--n-eval", type=int, default=100, help="held-out problems per task per checkpoint (0 = skip)")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the step times")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--teacher", type=Path, default=None, help="default: the bundled teacher")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--recipe", choices=("bundled", "smollm2"), default="bundled",
                    help="bundled: the demo's teacher and student on the bundled tasks; smollm2: the real-model "
                         "recipe (--config, --data), step time and memory only")
    ap.add_argument("--config", type=Path, default=Path("configs/smollm2-135m-to-10l.yaml"))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: both trainers on the GPU in bf16 (teacher weights bf16, student autocast); peak GPU "
                         "memory is reported too")
    ap.add_argument("--data", type=Path, default=Path("runs/smollm2/teacher_train.jsonl"),
                    help="training file of the smollm2 recipe (benchmarks/smollm2_cpu.sh writes it)")
    args = ap.parse_args()
    from hpd.config import load_config
    from hpd.apps.demo import BUNDLED_TEACHER, write_task_data

    if args.recipe == "smollm2":
        args.teacher = Path(load_config(args.config).teacher.path)
        args.n_eval = 0  # the bundled tasks are for the bundled models
    args.teacher = args.teacher or BUNDLED_TEACHER
    if args.worker:
        return worker(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    if any(m.startswith("gkd") for m in methods):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("the GKD runs need TRL: pip install trl==1.16.0") from None
    if args.recipe == "bundled":
        files = list(write_task_data(args.out, args.per_task, 30, args.seed))
    else:
        if not args.data.is_file():
            raise SystemExit(f"no training file {args.data}: run benchmarks/smollm2_cpu.sh first, or pass --data")
        args.out.mkdir(parents=True, exist_ok=True)
        initial_student(args)
        files = [args.data]
    if "hpd cached" in methods and not (args.out / f"cache-k{args.top_k}" / "manifest.json").is_file():
        from hpd.teachers.cache import build_teacher_cache

        cfg = method_config(args, "hpd online")
        build_teacher_cache(args.teacher, files, args.out / f"cache-k{args.top_k}", top_k=args.top_k,
                            data=cfg.data, temperature=cfg.objective.temperature)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    for m in methods:
        run_dir = args.out / slug(m)
        if (run_dir / "worker.json").is_file():
            print(f"[vs-trl] {m}: done, reused")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(f"[vs-trl] {m}: training {args.steps} steps (log {run_dir}/worker.log)", flush=True)
        with (run_dir / "worker.log").open("w") as log:
            cmd = [sys.executable, __file__, "--worker", m, *sys.argv[1:]]
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                raise SystemExit(f"{m} failed: see {run_dir}/worker.log\n" + (run_dir / "worker.log").read_text()[-3000:])
        print(f"[vs-trl] {m}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [summarize(args, m) for m in methods]
    text = tables(args, rows)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
