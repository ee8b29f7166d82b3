"""Cost of one training step, method by method, in process CPU seconds: is hpd lean?

For a recipe, builds one `hpd.training.trainer.Trainer` per method on the same data and seed (so step i
sees the same batch in every method) and times, step by step in turn (so a neighbour's load hits
every method alike), after warm-up:

    sft          a plain SFT step of the student (objective sft, no teacher forward)
    teacher fwd  the teacher's forward pass alone on the same batch (no grad, full logits)
    hpd          an hpd step with the online teacher
    hpd cached   an hpd step reading a teacher cache (top-K, built here once)
    fkl          a forward-KL step with the online teacher

and prints a markdown table (median CPU and wall seconds per step) with the ratios the project
targets: hpd / (sft + teacher fwd) <= 1.1 and hpd cached / sft <= 1.15.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/step_profile.py --recipe bundled
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/step_profile.py --recipe bundled --profile
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/step_profile.py --recipe smollm2 \
        --teacher-dir models/smollm2 --steps 3 --warmup 1

`--recipe bundled`: the bundled teacher (`hpd/assets/teacher`) and the demo student
(`hpd.apps.demo.student_config`: batch 32, max_length 160, unchunked loss) on the three tasks' data.
`--recipe smollm2`: the converted SmolLM2-135M teacher (read only) and a 10-layer student made of
every third layer, batch 4, max_length 160, chunk_size 256 (configs/smollm2-135m-to-10l.yaml) on
64 chat rows with one fixed made-up reply (only the timing matters). `--profile` also prints
torch.profiler's top operators by self CPU time for one hpd step (online and cached).
Scratch files (data, cache) go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPLY = ("Sure! Here is a short answer. The main idea is simple: start small, check each step, and keep notes "
         "of what works. Tides rise and fall twice a day because the moon pulls on the oceans, and the sun "
         "helps a little too. Bees talk by dancing, and dinosaurs lived for more than one hundred million years. "
         "I hope this helps, and have a lovely day!")

METHODS = ("sft", "teacher fwd", "hpd", "hpd cached", "fkl")


def recipe_configs(args) -> dict:
    """The run config of every trained method; builds the data, the cache (and the smollm2 student) once."""
    from hpd.config import load_config
    from hpd.apps.demo import BUNDLED_TEACHER, student_config, write_task_data

    out = args.out / args.recipe
    quiet = ["log.eval_every=0", "log.diagnostics_every=1000000", "log.progress=false", "log.tensorboard=off",
             "data.eval=", "save.every=0"]
    if args.recipe == "bundled":
        train, eval_ = write_task_data(out, args.per_task, 30, args.seed)

        def cfg(name, objective, extra=()):
            return student_config(out / "runs" / name, BUNDLED_TEACHER, train, eval_, objective=objective, steps=1000,
                                  seed=args.seed, extra=[*quiet, *extra])

        teacher = BUNDLED_TEACHER
        sft_extra = ["teacher.path=none"]
        cached_extra = []
    else:
        if args.teacher_dir is None:
            raise SystemExit("--recipe smollm2 needs --teacher-dir (the converted SmolLM2 directory)")
        train = out / "data" / "train.jsonl"
        train.parent.mkdir(parents=True, exist_ok=True)
        prompts = [json.loads(line) for line in Path("examples/chat_prompts.jsonl").read_text().splitlines()]
        rows = [{"messages": [*p["messages"], {"role": "assistant", "content": REPLY}]} for p in prompts[:64]]
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))

        def cfg(name, objective, extra=()):
            return load_config("configs/smollm2-135m-to-10l.yaml", [
                f"output_dir={out / 'runs' / name}", f"teacher.path={args.teacher_dir}", f"data.train={train}",
                f"objective.name={objective}", f"seed={args.seed}", "max_steps=1000",
                "optim.warmup_ratio=0", *quiet, *extra])

        teacher = Path(args.teacher_dir)
        sft_extra = []  # the student is built from the teacher's layers; sft never runs its forward
        # A cached run never loads the teacher, so its student (the same layers) is built once here.
        from hpd.models.from_teacher import save_student_from_teacher

        student_dir = save_student_from_teacher(str(teacher), "every:3", out / "student-every3")
        cached_extra = [f"student.path={student_dir}", "student.init_from_teacher=null"]
    cache_dir = out / f"cache-k{args.top_k}"
    if not (cache_dir / "manifest.json").is_file():
        from hpd.teachers.cache import build_teacher_cache

        probe = cfg("probe", "hpd")
        build_teacher_cache(teacher, [train], cache_dir, top_k=args.top_k, data=probe.data,
                            temperature=probe.objective.temperature, batch_size=8, log=None)
    return {
        "sft": cfg("sft", "sft", sft_extra),
        "hpd": cfg("hpd", "hpd"),
        "hpd cached": cfg("hpd-cached", "hpd", [f"teacher.cache={cache_dir}", *cached_extra]),
        "fkl": cfg("fkl", "fkl"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", choices=("bundled", "smollm2"), default="bundled")
    ap.add_argument("--teacher-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/step-profile"))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: bundled 20, smollm2 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: bundled 3, smollm2 1)")
    ap.add_argument("--per-task", type=int, default=200, help="bundled recipe: training problems per task")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for one hpd step")
    args = ap.parse_args()
    steps = args.steps if args.steps is not None else (20 if args.recipe == "bundled" else 3)
    warmup = args.warmup if args.warmup is not None else (3 if args.recipe == "bundled" else 1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from hpd.training.trainer import Trainer

    cfgs = recipe_configs(args)
    trainers = {name: Trainer(c) for name, c in cfgs.items()}
    hpd = trainers["hpd"]
    # The teacher forward alone, on the batches the trainers draw: a sampler of its own, same seed.
    from hpd.data.order import EpochSampler

    sampler = EpochSampler(len(hpd.train_data), hpd.cfg.optim.batch_size, seed=hpd.cfg.seed)

    def teacher_forward() -> None:
        for _ in range(hpd.cfg.optim.grad_accum):
            idx = next(sampler)
            b = hpd._examples_batch([hpd.train_data[i] for i in idx], idx, "train")
            with torch.inference_mode():
                hpd.teacher(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    runs = {"sft": trainers["sft"].train_step, "teacher fwd": teacher_forward, "hpd": hpd.train_step,
            "hpd cached": trainers["hpd cached"].train_step, "fkl": trainers["fkl"].train_step}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(warmup + steps):
        for m in METHODS:
            c0, t0 = time.process_time(), time.perf_counter()
            runs[m]()
            c1, t1 = time.process_time(), time.perf_counter()
            if m in trainers:
                trainers[m].step += 1
            if i >= warmup:
                cpu[m].append(c1 - c0)
                wall[m].append(t1 - t0)
    med = {m: statistics.median(cpu[m]) for m in METHODS}
    medw = {m: statistics.median(wall[m]) for m in METHODS}
    c = hpd.cfg
    lines = [
        f"Recipe `{args.recipe}`: batch {c.optim.batch_size}, max_length {c.data.max_length}, chunk_size "
        f"{c.objective.chunk_size}, {len(hpd.train_data)} rows, cache top-{args.top_k}; torch threads "
        f"{torch.get_num_threads()}; median of {steps} steps after {warmup} warm-up, methods interleaved step by step.",
        "",
        "| method | CPU s / step | wall s / step | x sft (CPU) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {m} | {med[m]:.4f} | {medw[m]:.4f} | {med[m] / med['sft']:.3f} |" for m in METHODS]
    lines += [
        "",
        f"- hpd / (sft + teacher fwd) = **{med['hpd'] / (med['sft'] + med['teacher fwd']):.3f}** (target <= 1.1)",
        f"- hpd cached / sft = **{med['hpd cached'] / med['sft']:.3f}** (target <= 1.15)",
        f"- fkl / (sft + teacher fwd) = {med['fkl'] / (med['sft'] + med['teacher fwd']):.3f}",
    ]
    print("\n".join(lines), flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for m in ("hpd", "hpd cached"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                trainers[m].train_step()
            print(f"\n### torch.profiler, one `{m}` step, top ops by self CPU time\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
