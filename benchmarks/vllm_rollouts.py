"""Student rollouts on vLLM against Hugging Face `generate`: throughput, CPU per on-policy step, weight sync.

On the bundled recipe's shape (32 prompts of the bundled tasks per step, up to 64 new tokens,
sampled at temperature 1, data.max_length 160, the bundled teacher, HPD), for each student:

- rollouts: one batch of 32 prompts sampled `--reps` times after a warm-up, by `hf` (in this
  process) and by `vllm` (a server started from the engine environment): generated tokens per
  wall second, and CPU seconds per 1000 tokens counting this process and the server's processes;
- on-policy steps: `--steps` optimizer steps of `regime.name=student` with each backend (the
  trainer's metrics.jsonl): the median step time (the first step, which starts the server, left
  out), CPU seconds per step (the trainer's `cpu_s` plus the server's), the weight sync's seconds
  (write the safetensors + reload_weights + prefix-cache reset) per step.

The trainer and the server each get one thread (OMP_NUM_THREADS=1; the server unbound,
VLLM_CPU_OMP_THREADS_BIND=nobind). The students are the bundled llama-3x128 and a student of the
teacher's size (a copy of the teacher); the recipe's own 96-wide student has head_dim 24, which
vLLM's CPU attention does not run.

    OMP_NUM_THREADS=1 python benchmarks/vllm_rollouts.py --out runs/vllm-rollouts   # ~15 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/vllm_rollouts.py --out /tmp/vr --smoke      # fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hpd.apps.bench import BenchSettings, gold_data  # noqa: E402
from hpd.apps.demo import BUNDLED_TEACHER, TASKS  # noqa: E402
from hpd.config import load_config  # noqa: E402
from hpd.data.rows import load_examples  # noqa: E402
from hpd.files import atomic_write_text  # noqa: E402
from hpd.models.loading import load_model  # noqa: E402
from hpd.responses.regimes import SamplingSettings  # noqa: E402
from hpd.responses.rollout import HFGenerate, encode_prompts  # noqa: E402
from hpd.training.trainer import Trainer  # noqa: E402
from hpd.responses.vllm_generate import VLLMGenerate, group_cpu_seconds  # noqa: E402

STUDENTS = {"llama-3x128": ROOT / "hpd" / "assets" / "students" / "llama-3x128", "teacher-size": BUNDLED_TEACHER}
BATCH, NEW_TOKENS, MAX_LENGTH = 32, 64, 160


def rollout_figures(student: Path, prompts: list[list[int]], reps: int) -> dict[str, dict]:
    """Per backend: tokens, wall seconds, this process's and the server's CPU seconds over `reps` batches."""
    model, tok = load_model(str(student))
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=1.0, batch_size=BATCH)
    out = {}
    for name, backend in (("hf", HFGenerate()), ("vllm", VLLMGenerate(max_model_len=MAX_LENGTH + NEW_TOKENS))):
        try:
            backend.generate(model, tok, prompts, settings, seed=999)  # warm-up (and the server's start)
            server = getattr(backend, "server", None)

            def server_cpu():
                return group_cpu_seconds(server.proc.pid) if server else 0.0

            s0, c0, t0 = server_cpu(), time.process_time(), time.perf_counter()
            tokens = sum(len(c) for r in range(reps) for c in backend.generate(model, tok, prompts, settings, seed=r))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            server_s = server_cpu() - s0
        finally:
            backend.close()
        out[name] = {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "server_cpu_s": server_s}
    return out


def step_figures(student: Path, data: Path, out: Path, steps: int, backend: str) -> dict:
    run_dir = out / f"{student.name}-{backend}"
    cfg = load_config(None, [
        f"output_dir={run_dir}", "resume=never", f"student.path={student}", f"teacher.path={BUNDLED_TEACHER}",
        f"data.train={data}", "data.eval_fraction=0", f"data.max_length={MAX_LENGTH}", "objective.name=hpd",
        "objective.chunk_size=0", "regime.name=student", f"regime.max_new_tokens={NEW_TOKENS}",
        f"regime.backend={backend}", f"optim.batch_size={BATCH}", "optim.lr=1e-3", f"max_steps={steps}",
        "log.every=1", "log.eval_every=0", "log.progress=false", "log.tensorboard=off", "save.every=0"])
    Trainer(cfg).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("type") == "train"]
    later = rows[1:]  # the first step starts the server (vllm) or warms up (hf)
    cpu = [(b["cpu_s"] - a["cpu_s"]) + (b.get("vllm_server_cpu_s", 0.0) - a.get("vllm_server_cpu_s", 0.0))
           for a, b in zip(rows, later)]
    syncs = rows[-1].get("vllm_syncs", 0.0)
    return {"step_s": statistics.median(r["step_time_s"] for r in later), "cpu_per_step_s": statistics.median(cpu),
            "tokens_per_step": (rows[-1]["generated_tokens_total"] - rows[0]["generated_tokens_total"]) / len(later),
            "sync_s": rows[-1]["vllm_sync_s"] / syncs if syncs else None, "syncs": syncs}


def table(results: dict) -> str:
    lines = ["| student | backend | rollout tok/s | rollout CPU s / 1k tok | on-policy step s (median) | "
             "CPU s / step (trainer + server) | weight sync s / step |", "|---|---|---|---|---|---|---|"]
    for student, res in results.items():
        for name in ("hf", "vllm"):
            r, s = res["rollouts"][name], res["steps"][name]
            tps = r["tokens"] / r["wall_s"]
            cpu_k = 1000 * (r["cpu_s"] + r["server_cpu_s"]) / r["tokens"]
            sync = f"{s['sync_s']:.3f}" if s["sync_s"] is not None else "-"
            lines.append(f"| {student} | {name} | {tps:.0f} | {cpu_k:.2f} | {s['step_s']:.2f} | {s['cpu_per_step_s']:.2f} | {sync} |")
        hf, vl = res["rollouts"]["hf"], res["rollouts"]["vllm"]
        ratio_tps = (vl["tokens"] / vl["wall_s"]) / (hf["tokens"] / hf["wall_s"])
        ratio_step = res["steps"]["vllm"]["step_s"] / res["steps"]["hf"]["step_s"]
        ratio_cpu = res["steps"]["vllm"]["cpu_per_step_s"] / res["steps"]["hf"]["cpu_per_step_s"]
        lines.append(f"| {student} | vllm / hf | {ratio_tps:.2f}x | | {ratio_step:.2f}x | {ratio_cpu:.2f}x | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vllm-rollouts"))
    ap.add_argument("--students", default=",".join(STUDENTS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.reps, args.students = 3, 1, "llama-3x128"
    torch.set_num_threads(1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    args.out.mkdir(parents=True, exist_ok=True)
    data, _ = gold_data(args.out / "data", list(TASKS), BenchSettings(train_per_task=200, n_val=10))
    _, tok = load_model(str(BUNDLED_TEACHER))
    rows = load_examples(str(data))[0][:BATCH]
    prompts = encode_prompts(tok, [r.prompt for r in rows])
    results = {}
    for name in args.students.split(","):
        student = STUDENTS[name]
        results[name] = {"rollouts": rollout_figures(student, prompts, args.reps),
                         "steps": {b: step_figures(student, data, args.out, args.steps, b) for b in ("hf", "vllm")}}
    text = (f"{table(results)}\n\nload average at the end: {os.getloadavg()[0]:.1f} (2 cores, shared)\n")
    print(text)
    atomic_write_text(args.out / "results.md", text)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
