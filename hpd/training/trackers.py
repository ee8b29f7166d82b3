"""Experiment trackers for a run: TensorBoard, Weights & Biases, MLflow, through accelerate.

`log.report_to` names them as transformers' `report_to` does; `resolve_trackers` turns it (and
`log.tensorboard`) into the list a run uses, failing early when a package is missing;
`make_trackers` builds accelerate's tracker objects, each writing under the run directory when it
works offline; the trainer hands them to `Accelerator(log_with=...)`, starts them with
`init_trackers` and sends every metrics.jsonl line through `accelerator.log`:

- tensorboard: event files in `RUN/tensorboard/`;
- mlflow: a file store in `RUN/mlruns/` (experiment `hpd`, or `MLFLOW_EXPERIMENT_NAME`), unless
  `MLFLOW_TRACKING_URI` names a server;
- wandb: `RUN/wandb/` (project `hpd`, or `WANDB_PROJECT`); with `WANDB_MODE=offline` nothing is
  sent (`wandb sync RUN/wandb/offline-run-*` uploads it later).

    >>> resolve_trackers([], "off"), resolve_trackers(["none"], "auto")
    ([], [])
    >>> tracker_values({"type": "train", "step": 3, "loss": 0.5, "regime": "dataset", "kl": float("nan")})
    {'train/loss': 0.5}
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from hpd.errors import HPDError

# tracker -> the module its accelerate tracker imports
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "hpd"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES[name]) is not None


def resolve_trackers(report_to: list[str], tensorboard: str) -> list[str]:
    """The trackers of a run: those `report_to` names ([] = TensorBoard as `tensorboard` says:
    auto = when installed, on = required, off = never; ["none"] = none at all).

    A tracker asked for by name whose package is missing is an HPDError naming the install.
    """
    if report_to == ["none"]:
        return []
    names = list(report_to)
    if tensorboard == "on" and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    elif tensorboard == "auto" and not names and _installed("tensorboard"):
        names = ["tensorboard"]
    for name in names:
        if not _installed(name):
            why = "log.tensorboard=on" if name == "tensorboard" and name not in report_to else f"log.report_to lists {name}"
            raise HPDError(f"{why} but {name} is not installed: pip install {name} (or pip install 'hpd-distill[trackers]')")
    return names


def make_trackers(names: list[str], run_dir: Path) -> list[Any]:
    """accelerate tracker objects for `names`, writing under `run_dir` (not started yet)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    run_dir = Path(run_dir)
    trackers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            # accelerate writes to logging_dir/run_name: an empty run name keeps RUN/tensorboard/ itself.
            trackers.append(TensorBoardTracker("", str(run_dir / "tensorboard")))
        elif name == "wandb":
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), dir=str(run_dir),
                                         name=run_dir.resolve().name))
        elif name == "mlflow":
            trackers.append(MLflowTracker(experiment_name=PROJECT, run_name=run_dir.resolve().name))
    return trackers


def start_trackers(accelerator: Any, names: list[str], run_dir: Path, config: dict[str, Any]) -> None:
    """Start the accelerator's trackers (main process) with the run's config as hyperparameters."""
    if not names or not accelerator.is_main_process:
        return
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # A file store in the run directory: no server, no network, found next to the run's metrics.
        # MLflow 3 keeps that store in maintenance and refuses it unless allowed (a database store
        # needs the full mlflow package and SQLAlchemy).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
    accelerator.init_trackers(PROJECT, config=flat_config(config))


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `{dotted.key: scalar}` (what every tracker accepts as hyperparameters)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif value is None or isinstance(value, (list, tuple)):
            out[name] = str(value)  # TensorBoard's hparams take scalars only
        else:
            out[name] = value
    return out


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, named `TYPE/KEY` (train/loss, eval/kl, ...)."""
    kind = record.get("type", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def finish_trackers(accelerator: Any) -> None:
    """Close the trackers (flush TensorBoard, end the MLflow run, finish W&B); main process."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()


__all__ = ["finish_trackers", "flat_config", "make_trackers", "resolve_trackers", "start_trackers", "tracker_values"]
