"""Progress of the long commands (hpd.training.progress): lines with an ETA in a log, a labelled bar on a
terminal, and what train, generate, eval and cache-teacher show."""

from __future__ import annotations

import io
import json
import re

import pytest
from typer.testing import CliRunner

from hpd.apps.cli import app
from hpd.config import load_config
from hpd.training.progress import Progress, format_duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _clock(monkeypatch) -> list[float]:
    now = [0.0]
    monkeypatch.setattr("hpd.training.progress.time.monotonic", lambda: now[0])
    return now


def test_a_log_gets_lines_with_count_share_and_eta(monkeypatch):
    now = _clock(monkeypatch)
    log = io.StringIO()
    p = Progress(4, "train", unit="step", file=log, every=15)
    now[0] = 10.0
    p.update(1, loss=2.5)  # not yet 15 s since the start: no line
    assert log.getvalue() == ""
    now[0] = 20.0
    p.update(1, loss=2.0)  # a line; 2 steps in 20 s, 2 left -> ETA 20 s
    assert log.getvalue() == "train: 2/4 steps (50%), 20s elapsed, ETA 20s, loss=2\n"
    now[0] = 41.0
    p.update(2)  # the last step always writes its line, without an ETA
    assert log.getvalue().splitlines()[-1] == "train: 4/4 steps (100%), 41s elapsed, loss=2"
    p.close()
    assert len(log.getvalue().splitlines()) == 2


def test_eta_counts_only_the_units_done_since_the_start(monkeypatch):
    # A resumed run (initial=50) must not count the 50 earlier steps as done in no time.
    now = _clock(monkeypatch)
    log = io.StringIO()
    p = Progress(100, "x", unit="step", initial=50, file=log, every=0)
    now[0] = 30.0
    p.update(10)
    assert log.getvalue() == "x: 60/100 steps (60%), 30s elapsed, ETA 2m00s\n"
    p.close()  # stopped early: one more line says where
    assert len(log.getvalue().splitlines()) == 2


def test_a_terminal_gets_a_labelled_bar_and_disabled_shows_nothing():
    term = _Terminal()
    with Progress(3, "hpd (dataset)", unit="step", file=term) as p:
        for _ in range(3):
            p.update(1, loss=1.25)
    out = term.getvalue()
    assert "\r" in out and "hpd (dataset): 100%" in out and "3/3" in out and "loss=1.25" in out
    quiet = _Terminal()
    with Progress(3, "x", file=quiet, enabled=False) as p:
        p.update(3)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("seconds, text", [(4.4, "4s"), (65, "1m05s"), (7384, "2h03m")])
def test_durations_read_at_a_glance(seconds, text):
    assert format_duration(seconds) == text


def test_training_shows_progress_labelled_by_objective_and_regime(tmp_path, repo_root, monkeypatch, capsys):
    from hpd.training.trainer import train

    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "max_steps=3", "log.progress=true",
                                            "log.tensorboard=off", "data.max_length=32", "objective.name=fkl"])
    train(cfg)
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.startswith("fkl (dataset): ")][-1]
    assert re.fullmatch(r"fkl \(dataset\): 3/3 steps \(100%\), \d+s elapsed, loss=[\d.e+-]+", last), last
    assert "hpd hpd" not in err and "hpd fkl" not in err


def test_generate_eval_and_cache_teacher_show_progress(tmp_path, tiny_teacher):
    runner = CliRunner()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": "x"}) + "\n" for i in range(3)))
    gen = runner.invoke(app, ["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl"),
                              "--max-new-tokens", "2", "--batch-size", "2"])
    assert gen.exit_code == 0, gen.output
    assert "generate: 3/3 prompts (100%)" in gen.stderr and "generate:" not in gen.stdout
    ev = runner.invoke(app, ["eval", "--model", str(tiny_teacher), "--task", "dialogue", "--n", "3",
                             "--max-new-tokens", "2", "--out", str(tmp_path / "e.jsonl")])
    assert ev.exit_code == 0, ev.output
    assert "eval dialogue: 3/3 prompts (100%)" in ev.stderr
    cache = runner.invoke(app, ["cache-teacher", "--teacher", str(tiny_teacher), "--data", str(prompts),
                                "--out", str(tmp_path / "cache"), "--top-k", "2"])
    assert cache.exit_code == 0, cache.output
    assert "cache-teacher: 3/3 sequences (100%)" in cache.stderr
