"""Experiment trackers (`log.report_to`): each writes its files under the run directory, offline,
with the numbers of metrics.jsonl; a tracker whose package is missing stops the run before it starts.

Each tracker's test is skipped when its package is not installed (pip install 'hpd-distill[trackers]').
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hpd.config import load_config
from hpd.errors import HPDError
from hpd.training.trackers import resolve_trackers, tracker_values
from hpd.training.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FAST = ["max_steps=3", "data.max_length=32", "log.progress=false", "save.every=0", "log.every=1", "log.eval_every=2",
        "student.tiny_layers=1", "student.tiny_hidden=32", "teacher.tiny_layers=1", "teacher.tiny_hidden=32"]


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


def _run(tmp_path: Path, repo_root: Path, monkeypatch, tracker: str) -> tuple[Path, dict[str, dict[int, float]]]:
    """A 3-step tiny run reporting to `tracker`; its metrics.jsonl as {TYPE/KEY: {step: value}}."""
    monkeypatch.chdir(repo_root)
    run = train(load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", f"log.report_to={tracker}", *FAST]))
    logged: dict[str, dict[int, float]] = {}
    for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for key, value in tracker_values(rec).items():
            logged.setdefault(key, {})[rec["step"]] = value
    return run, logged


@_needs("tensorboard")
def test_tensorboard_writes_event_files_with_the_run_metrics(tmp_path, repo_root, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, logged = _run(tmp_path, repo_root, monkeypatch, "tensorboard")
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/value", "train/kl", "eval/value"} <= tags
    for tag in ("train/loss", "eval/value"):
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx(logged[tag], rel=1e-6), tag  # float32 in the event file


@_needs("mlflow")
def test_mlflow_writes_a_file_store_in_the_run_dir(tmp_path, repo_root, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, logged = _run(tmp_path, repo_root, monkeypatch, "mlflow")
    runs = [p for p in (run / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert len(runs) == 1, list((run / "mlruns").rglob("*"))
    loss_file = runs[0] / "metrics" / "train" / "loss"
    got = {int(step): float(value) for _ts, value, step in (line.split() for line in loss_file.read_text().splitlines())}
    assert got == pytest.approx(logged["train/loss"], rel=1e-12)
    params = runs[0] / "params"
    assert (params / "objective.name").read_text() == "hpd" and (params / "max_steps").read_text() == "3"


@_needs("wandb")
def test_wandb_offline_writes_its_run_dir_without_network(tmp_path, repo_root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, _ = _run(tmp_path, repo_root, monkeypatch, "wandb")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    data = list(offline[0].glob("run-*.wandb"))
    assert len(data) == 1 and data[0].stat().st_size > 0


def test_report_to_resolution_and_a_missing_package(monkeypatch):
    import hpd.training.trackers as trackers

    monkeypatch.setattr(trackers, "_installed", lambda name: name != "wandb")
    assert resolve_trackers([], "auto") == ["tensorboard"]  # installed and nothing named: the old default
    assert resolve_trackers([], "off") == [] and resolve_trackers(["none"], "on") == []
    assert resolve_trackers(["mlflow"], "auto") == ["mlflow"]  # named trackers only
    assert resolve_trackers(["mlflow"], "on") == ["tensorboard", "mlflow"]
    with pytest.raises(HPDError, match=r"log.report_to lists wandb but wandb is not installed: pip install wandb"):
        resolve_trackers(["mlflow", "wandb"], "auto")
    monkeypatch.setattr(trackers, "_installed", lambda name: False)
    assert resolve_trackers([], "auto") == []
    with pytest.raises(HPDError, match="log.tensorboard=on but tensorboard is not installed"):
        resolve_trackers([], "on")


def test_a_missing_tracker_stops_the_run_before_anything_is_written(tmp_path, monkeypatch, repo_root):
    import hpd.training.trackers as trackers

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(trackers, "_installed", lambda name: False)
    with pytest.raises(HPDError, match="mlflow is not installed"):
        Trainer(load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "log.report_to=mlflow", *FAST]))
    assert not (tmp_path / "run").exists()
