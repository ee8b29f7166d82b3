"""`hpd demo` (`make demo`): the bundled teacher distilled into a small student, HPD against SFT.

1. loads the bundled teacher (`hpd/assets/teacher`, a 1.9M-parameter byte-level Llama trained by
   `scripts/build_teacher.sh` on the three verifiable tasks);
2. writes training problems with reference solutions (`hpd data`) and held-out problems;
3. distills the default student (2 layers, hidden 96: about 7x fewer parameters) with `hpd` and,
   at the same steps, batch and learning rate, with plain `sft` on the same data, both runs side by
   side;
4. evaluates the teacher and both students on held-out problems of every task (greedy decoding,
   real verifiers), prints a table (accuracy per task with 95% intervals, wall time) and writes it
   to `OUT/results.md`, the training-dynamics plots to `OUT/plots/`, the students to
   `OUT/runs/{hpd,sft}/final/`.

    hpd demo                       # runs/demo, about 6 minutes on 2 CPU cores
    hpd demo --steps 20 --n 10     # a quick look

Runs already finished in OUT are reused, so a second `hpd demo` only evaluates.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from hpd.config import Config, load_config
from hpd.errors import HPDError

TASKS = ("math", "code", "dialogue")
BUNDLED_TEACHER = Path(__file__).resolve().parent / "assets" / "teacher"

# The default student and its training settings: one place, shared by the demo and the benchmark.
STUDENT_OVERRIDES = [
    "student.path=tiny", "student.tiny_layers=2", "student.tiny_hidden=96", "student.tiny_heads=4",
    "student.tiny_intermediate=256", "student.tiny_max_positions=256",
    "data.max_length=160", "objective.chunk_size=0", "regime.max_new_tokens=64",
    "optim.lr=3e-3", "optim.batch_size=32", "optim.warmup_ratio=0.05", "optim.min_lr_ratio=0.1",
    "log.every=5", "log.eval_batches=4", "save.every=100", "save.keep_last=1",
]


@dataclass
class DemoSettings:
    out_dir: Path = Path("runs/demo")
    teacher: Path = BUNDLED_TEACHER
    steps: int = 1000
    n_eval: int = 100
    train_per_task: int = 4000
    seed: int = 0
    jobs: int = 2


def student_config(out: Path, teacher: Path, train: Path, eval_: Path, *, objective: str, steps: int, seed: int,
                   extra: list[str] = ()) -> Config:
    """The default student's run config for one objective (shared with `hpd bench`)."""
    return load_config(None, [f"output_dir={out}", f"teacher.path={teacher}", f"data.train={train}", f"data.eval={eval_}",
                              f"objective.name={objective}", f"max_steps={steps}", f"seed={seed}",
                              f"log.eval_every={max(steps // 4, 1)}", *STUDENT_OVERRIDES, *extra])


def write_task_data(out: Path, per_task: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Training problems (train split) and held-out problems for the eval loss (test split)."""
    from hpd.tasks import mixed_dataset, write_jsonl

    train, eval_ = out / "data" / "train.jsonl", out / "data" / "eval.jsonl"
    if not train.is_file():
        write_jsonl(mixed_dataset({t: per_task for t in TASKS}, split="train", seed=seed), train)
    if not eval_.is_file():
        write_jsonl(mixed_dataset({t: max(n_eval // 3, 10) for t in TASKS}, split="test", seed=seed + 1), eval_)
    return train, eval_


def format_table(rows: list[dict]) -> str:
    head = "| model | params | " + " | ".join(TASKS) + " | mean | train wall time |"
    lines = [head, "|" + "---|" * (len(TASKS) + 4)]
    for r in rows:
        cells = [f"{100 * r['eval'][t]['accuracy']:.1f}% ({100 * r['eval'][t]['ci_low']:.0f}-{100 * r['eval'][t]['ci_high']:.0f})"
                 for t in TASKS]
        mean = sum(r["eval"][t]["accuracy"] for t in TASKS) / len(TASKS)
        wall = f"{r['wall_s']:.0f} s" if r.get("wall_s") else "-"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | " + " | ".join(cells) + f" | {100 * mean:.1f}% | {wall} |")
    return "\n".join(lines)


def preflight_tasks() -> None:
    """Fail before training if a task cannot be verified here (the code task needs its sandbox)."""
    from hpd.tasks import get_task

    for name in TASKS:
        get_task(name).preflight()


def run_demo(s: DemoSettings) -> Path:
    from hpd.experiments import evaluate_on_tasks, read_records, run_configs
    from hpd.plots import plot_runs

    if not (s.teacher / "config.json").is_file():
        raise HPDError(f"no teacher at {s.teacher}: pass --teacher DIR, or rebuild the bundled one with "
                       "`bash scripts/build_teacher.sh`")
    preflight_tasks()
    out = Path(s.out_dir)
    t_start = time.perf_counter()
    print(f"[demo] teacher: {s.teacher}")
    train, eval_ = write_task_data(out, s.train_per_task, s.n_eval, s.seed)
    print(f"[demo] data: {train} (train split), {eval_} (held-out); distilling with hpd and sft, {s.steps} steps each")
    names = ["hpd", "sft"]
    cfgs = [student_config(out / "runs" / n, s.teacher, train, eval_, objective=n, steps=s.steps, seed=s.seed) for n in names]
    run_configs(cfgs, jobs=s.jobs, labels=names)

    rows = []
    from hpd.models import load_model

    for name, model_dir in [("teacher", s.teacher)] + [(f"student {n}", out / "runs" / n / "final") for n in names]:
        print(f"[demo] evaluating {name} on {s.n_eval} held-out problems per task")
        ev = evaluate_on_tasks(model_dir, list(TASKS), n=s.n_eval, seed=s.seed,
                               out_dir=out / "eval" / name.replace(" ", "-"))
        params = sum(p.numel() for p in load_model(str(model_dir))[0].parameters())
        wall = None
        if name.startswith("student"):
            recs = read_records(out / "runs" / name.split()[1])
            wall = recs[-1].get("elapsed_s") if recs else None
        rows.append({"name": name, "params": params, "eval": ev, "wall_s": wall})

    table = format_table(rows)
    plots = plot_runs([out / "runs" / n for n in names], out / "plots")
    total = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(
        f"# hpd demo\n\nTeacher {s.teacher}; students distilled for {s.steps} steps (batch 32) on the same data; "
        f"held-out accuracy on {s.n_eval} problems per task (greedy), 95% Wilson intervals in brackets.\n\n{table}\n")
    print()
    print(table)
    print()
    print(f"[demo] done in {total:.0f} s. Table: {out / 'results.md'}; plots: {out / 'plots'} ({len(plots)} figures); "
          f"students: {out / 'runs' / 'hpd' / 'final'}, {out / 'runs' / 'sft' / 'final'}")
    return out
