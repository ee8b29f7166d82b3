"""Run several training configs side by side and evaluate the results: the runner of the scripts
under `benchmarks/` (`hpd bench` and `hpd demo` use `hpd.apps.bench.run_all` instead, which also
scores each run and keeps it in the archive).

`run_configs` starts each config as its own `hpd train` process (several at once, one CPU thread
each: for small models two single-threaded runs finish sooner than two two-threaded runs in turn),
shows one progress bar per run read from its `metrics.jsonl`, and skips runs whose `final/` model
already exists, so an interrupted batch of runs resumes where it stopped (each run resumes from its
own last checkpoint too). `evaluate_on_tasks` scores a model on held-out problems of the bundled
tasks.

    >>> from hpd.config import load_config
    >>> from hpd.apps.experiments import run_configs
    >>> cfgs = [load_config("configs/tiny.yaml", [f"output_dir=/tmp/hpd-exp/{n}", "max_steps=3", f"objective.name={n}"])
    ...         for n in ("hpd", "sft")]
    >>> dirs = run_configs(cfgs, jobs=2)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpd.config import Config, save_config
from hpd.errors import HPDError
from hpd.training.metrics_file import read_records as metrics_records
from hpd.training.progress import Progress


def last_step(run_dir: Path) -> int:
    """The last train step logged in a run's metrics.jsonl (0 if none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((int(r.get("step", 0)) for r in metrics_records(path) if r.get("type") in ("train", "skip")), default=0)


def run_slug(label: str) -> str:
    """A method label as a directory name: `"gkd (jsd mixed 0.5)"` -> `"gkd-jsd-mixed-0-5"`."""
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").replace("--", "-")


def read_records(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    """The records of one type of a run's metrics.jsonl, as the run stands (`hpd.training.metrics_file`)."""
    return metrics_records(Path(run_dir) / "metrics.jsonl", kind)


def run_configs(configs: list[Config], *, jobs: int = 2, labels: list[str] | None = None, progress: bool = True,
                threads_per_job: int | None = None) -> list[Path]:
    """Train every config (skipping finished runs), `jobs` at a time; returns the run directories.

    A failed run raises HPDError with the end of its log.
    """
    labels = labels or [Path(c.output_dir).name for c in configs]
    todo = [(label, cfg) for label, cfg in zip(labels, configs) if not (Path(cfg.output_dir) / "final" / "config.json").is_file()]
    threads = threads_per_job or max(1, (os.cpu_count() or 1) // max(1, min(jobs, len(todo) or 1)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    pending = list(todo)
    running: list[tuple[str, Config, subprocess.Popen, Path]] = []
    # One bar over the steps of every run still to train (resumed runs count what they have done).
    done = {label: last_step(Path(cfg.output_dir)) for label, cfg in todo}
    bar = Progress(sum(cfg.max_steps for _, cfg in todo), f"train {len(todo)} run{'s' * (len(todo) != 1)}",
                   unit="step", initial=sum(done.values()), enabled=progress and bool(todo))
    with bar:
        while pending or running:
            while pending and len(running) < jobs:
                label, cfg = pending.pop(0)
                run_dir = Path(cfg.output_dir)
                run_dir.mkdir(parents=True, exist_ok=True)
                cfg_path = run_dir.parent / f".{run_dir.name}.yaml"
                save_config(cfg, cfg_path)
                log = (run_dir.parent / f"{run_dir.name}.log").open("w")
                proc = subprocess.Popen([sys.executable, "-m", "hpd.apps.cli", "train", str(cfg_path), "log.progress=false"],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((label, cfg, proc, run_dir.parent / f"{run_dir.name}.log"))
            time.sleep(0.5)
            for item in list(running):
                label, cfg, proc, log_path = item
                finished = proc.poll() is not None
                if bar.enabled:
                    step = cfg.max_steps if finished and proc.returncode == 0 else last_step(Path(cfg.output_dir))
                    bar.update(step - done[label], running=",".join(r[0] for r in running))
                    done[label] = step
                if finished:
                    running.remove(item)
                    if proc.returncode != 0:
                        for _, _, other, _ in running:
                            other.terminate()
                        tail = "\n".join(log_path.read_text().splitlines()[-15:])
                        raise HPDError(f"run {label} failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    return [Path(c.output_dir) for c in configs]


def evaluate_on_tasks(model_dir: str | Path, tasks: list[str], *, n: int, seed: int = 0, batch_size: int = 50,
                      out_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Held-out accuracy of a model on each task: {task: {accuracy, ci_low, ci_high, n, correct}}."""
    from hpd.apps.evaluate import evaluate_model, write_records
    from hpd.models.loading import load_model

    model, tokenizer = load_model(str(model_dir))
    model.eval()
    results = {}
    for task in tasks:
        res = evaluate_model(model, tokenizer, task, n=n, seed=seed, batch_size=batch_size)
        if out_dir is not None:
            write_records(res, Path(out_dir) / f"eval-{task.split(':')[0]}.jsonl")
        results[task] = {"accuracy": res.accuracy, "ci_low": res.ci_low, "ci_high": res.ci_high, "n": res.n,
                         "correct": res.correct}
    return results
