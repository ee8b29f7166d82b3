"""The bundled recipe that `hpd demo` and `hpd bench` share: the three verifiable tasks, the bundled
teacher, the default student's settings (`student_config`) and the task data (`write_task_data`).
Below both applications, so that neither imports the other for it.

    >>> from hpd.apps.recipe import BUNDLED_TEACHER, TASKS, STUDENT_OVERRIDES
    >>> TASKS, BUNDLED_TEACHER.name, "student.path=tiny" in STUDENT_OVERRIDES
    (('math', 'code', 'dialogue'), 'teacher', True)
"""

from __future__ import annotations

from pathlib import Path

from hpd.config import Config, load_config

TASKS = ("math", "code", "dialogue")
BUNDLED_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "teacher"

# The default student and its training settings: one place, shared by the demo and the benchmark.
STUDENT_OVERRIDES = [
    "student.path=tiny", "student.tiny_layers=2", "student.tiny_hidden=96", "student.tiny_heads=4",
    "student.tiny_intermediate=256", "student.tiny_max_positions=256",
    "data.max_length=160", "objective.chunk_size=0", "regime.max_new_tokens=64",
    "optim.lr=3e-3", "optim.batch_size=32", "optim.warmup_ratio=0.05", "optim.min_lr_ratio=0.1",
    "log.every=5", "log.eval_batches=4", "save.every=100", "save.keep_last=1",
]


def student_config(out: Path, teacher: Path, train: Path, eval_: Path, *, objective: str, steps: int, seed: int,
                   extra: list[str] = ()) -> Config:
    """The default student's run config for one objective (shared with `hpd bench`)."""
    return load_config(None, [f"output_dir={out}", f"teacher.path={teacher}", f"data.train={train}", f"data.eval={eval_}",
                              f"objective.name={objective}", f"max_steps={steps}", f"seed={seed}",
                              f"log.eval_every={max(steps // 4, 1)}", *STUDENT_OVERRIDES, *extra])


def write_task_data(out: Path, per_task: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Training problems (train split) and held-out problems for the eval loss (test split)."""
    from hpd.apps.tasks import mixed_dataset, write_jsonl

    train, eval_ = out / "data" / "train.jsonl", out / "data" / "eval.jsonl"
    if not train.is_file():
        write_jsonl(mixed_dataset({t: per_task for t in TASKS}, split="train", seed=seed), train)
    if not eval_.is_file():
        write_jsonl(mixed_dataset({t: max(n_eval // 3, 10) for t in TASKS}, split="test", seed=seed + 1), eval_)
    return train, eval_


def preflight_tasks() -> None:
    """Fail before training if a task cannot be verified here (the code task needs its sandbox)."""
    from hpd.apps.tasks import get_task

    for name in TASKS:
        get_task(name).preflight()
