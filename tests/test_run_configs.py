"""`hpd.apps.experiments.run_configs`: several `hpd train` processes at once, one progress bar, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpd.config import load_config
from hpd.errors import HPDError
from hpd.apps.experiments import run_configs

FAST = ["teacher.path=none", "objective.name=sft", "student.path=tiny", "data.train=examples/tiny.jsonl",
        "data.eval=null", "data.max_length=48", "max_steps=2", "optim.batch_size=2", "log.every=1",
        "log.eval_every=0", "save.every=0", "log.tensorboard=off"]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


def test_runs_train_in_parallel_with_one_progress_line_and_finished_runs_are_skipped(tmp_path, capsys):
    cfgs = [load_config(None, [*FAST, f"output_dir={tmp_path / name}", f"seed={i}"]) for i, name in enumerate("ab")]
    dirs = run_configs(cfgs, jobs=2, threads_per_job=1)
    assert dirs == [tmp_path / "a", tmp_path / "b"]
    assert all((d / "final" / "config.json").is_file() for d in dirs)
    err = capsys.readouterr().err
    assert "train 2 runs: 4/4 steps (100%)" in err  # no terminal: plain lines, the last one complete
    before = [(d / "final" / "model.safetensors").stat().st_mtime_ns for d in dirs]
    run_configs(cfgs, jobs=2, threads_per_job=1)  # nothing left to do: nothing retrained, nothing printed
    assert [(d / "final" / "model.safetensors").stat().st_mtime_ns for d in dirs] == before
    assert "train" not in capsys.readouterr().err


def test_a_failed_run_is_an_error_with_the_end_of_its_log(tmp_path):
    cfg = load_config(None, [*FAST, f"output_dir={tmp_path / 'bad'}", "data.train=/nonexistent/train.jsonl"])
    with pytest.raises(HPDError, match=r"run bad failed \(exit [1-9]\d*\); end of .*bad\.log:\n(.|\n)*nonexistent"):
        run_configs([cfg], jobs=1, labels=["bad"], threads_per_job=1)
