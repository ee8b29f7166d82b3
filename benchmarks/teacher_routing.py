"""What a teacher per row costs: the bundled recipe's HPD step with one teacher against the same rows
routed by their task to three named teachers (`teacher.named`, `data.teacher_column=task`).

Only one trained teacher is bundled, so the three named teachers are copies of it (or caches of it):
every row meets the same teacher, and the routed runs differ from the single-teacher run only in
what routing does (the micro-batch split into one sub-batch per teacher, a forward per teacher,
the views put back together, the weights computed per part). Rows:

- `one teacher`: the bundled teacher as the run's teacher (no routing);
- `routed, 3 online`: math, code and dialogue rows each to their own online copy;
- `routed, online + 2 caches`: math online, code and dialogue from a top-32 cache (built once).

Each trains `--steps` steps on one torch thread; the table gives the median step time (after the
first 3), the CPU seconds per step (`cpu_s`, comparable on a shared machine) and the teacher
tokens per step (forward cost).

    OMP_NUM_THREADS=1 python benchmarks/teacher_routing.py --out /tmp/bench-routing
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from hpd.apps.recipe import BUNDLED_TEACHER, student_config, write_task_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-routing"))
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    import torch

    from hpd.apps.experiments import read_records
    from hpd.teachers.cache import build_teacher_cache
    from hpd.training.trainer import train

    torch.set_num_threads(1)
    train_file, eval_file = write_task_data(args.out, args.per_task, 30, seed=0)
    cache = args.out / "cache"
    if not (cache / "manifest.json").is_file():
        cfg = student_config(args.out / "probe", BUNDLED_TEACHER, train_file, eval_file, objective="hpd", steps=1, seed=0)
        build_teacher_cache(BUNDLED_TEACHER, [train_file, eval_file], cache, top_k=32, data=cfg.data, log=None)
    common = ["log.progress=false", "log.tensorboard=off", "log.every=1", "log.eval_every=0", "save.every=0",
              "log.diagnostics_every=1000000"]
    routed = ["teacher.path=none", "data.teacher_column=task"]
    setups = {
        "one teacher": [],
        "routed, 3 online": [*routed, *(f"teacher.named.{t}.path={BUNDLED_TEACHER}" for t in ("math", "code", "dialogue"))],
        "routed, online + 2 caches": [*routed, f"teacher.named.math.path={BUNDLED_TEACHER}",
                                      f"teacher.named.code.cache={cache}", f"teacher.named.dialogue.cache={cache}"],
    }
    print(f"| setup | median step | cpu s / step | teacher tokens / step | steps |")
    print("|---|---|---|---|---|")
    for name, extra in setups.items():
        run = args.out / name.replace(" ", "-").replace(",", "").replace("+", "plus")
        cfg = student_config(run, BUNDLED_TEACHER, train_file, eval_file, objective="hpd", steps=args.steps, seed=0,
                             extra=[*common, *extra])
        if not (run / "final" / "config.json").is_file():
            train(cfg)
        recs = read_records(run)
        times = [r["step_time_s"] for r in recs if r["step"] > 3]
        cpu = (recs[-1]["cpu_s"] - recs[2]["cpu_s"]) / (len(recs) - 3)
        teacher = recs[-1]["teacher_tokens_total"] / len(recs)
        print(f"| {name} | {statistics.median(times):.3f} s | {cpu:.3f} | {teacher:.0f} | {len(recs)} |")


if __name__ == "__main__":
    main()
