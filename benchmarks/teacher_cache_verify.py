"""What checking a teacher cache against its manifest costs, next to the training it serves.

Builds a teacher cache of the bundled teacher over the bundled-task training data
(`hpd.apps.demo.write_task_data`, `--per-task` problems per task, top-K `--top-k`, float16), then:

1. times hashing every array file once (what a training process does: the index arrays when it
   opens the cache, each shard when a batch first reads it), as seconds and MB/s;
2. trains the demo's student with `teacher.cache` for `--steps` steps (one torch thread) and takes
   the median step time;

and prints the cache size, the hashing time, and that time in training steps (hashing happens once
per process per shard, so a run of S steps pays it once, not S times).

    OMP_NUM_THREADS=1 python benchmarks/teacher_cache_verify.py --out /tmp/cache-verify
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from hpd.apps.demo import BUNDLED_TEACHER, student_config, write_task_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-cache-verify"))
    ap.add_argument("--per-task", type=int, default=1000)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    import hpd.teachers.cache as tc
    from hpd.apps.experiments import read_records
    from hpd.training.trainer import train

    train_file, eval_file = write_task_data(args.out, args.per_task, 50, seed=0)
    cache = args.out / "cache"
    if not (cache / "manifest.json").is_file():
        cfg = student_config(args.out / "probe", BUNDLED_TEACHER, train_file, eval_file, objective="hpd", steps=1, seed=0)
        tc.build_teacher_cache(BUNDLED_TEACHER, [train_file, eval_file], cache, top_k=args.top_k, data=cfg.data, log=print)
    files = sorted(cache.glob("*.npy")) + sorted(cache.glob("shard-*/*.npy"))
    size = sum(f.stat().st_size for f in files)
    hash_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        for f in files:
            tc.file_sha256(f)
        hash_s.append(time.perf_counter() - t0)
    hash_time = statistics.median(hash_s)

    run = args.out / f"run-{args.steps}"
    cfg = student_config(run, BUNDLED_TEACHER, train_file, eval_file, objective="hpd", steps=args.steps, seed=0,
                         extra=[f"teacher.cache={cache}", "log.progress=false", "log.tensorboard=off", "log.every=1",
                                "log.eval_every=0", "save.every=0", "log.diagnostics_every=1000000"])
    if not (run / "final" / "config.json").is_file():
        train(cfg)
    times = [r["step_time_s"] for r in read_records(run) if r.get("step_time_s") and r["step"] > 3]
    step = statistics.median(times)
    print("| cache | files | hash all once | throughput | median cached step | hash / step |")
    print("|---|---|---|---|---|---|")
    print(f"| {size / 2**20:.1f} MiB | {len(files)} | {hash_time:.3f} s | {size / 2**20 / hash_time:.0f} MiB/s | "
          f"{step:.3f} s | {hash_time / step:.2f} steps |")


if __name__ == "__main__":
    main()
