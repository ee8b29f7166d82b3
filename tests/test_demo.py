"""`hpd demo` and `hpd bench` end to end, in fast settings, on the bundled teacher."""

from __future__ import annotations

import json

import pytest

from hpd.bench import METHODS, BenchSettings, loss_spikes, run_bench
from hpd.demo import BUNDLED_TEACHER, TASKS, DemoSettings, run_demo
from hpd.errors import HPDError


def test_bundled_teacher_is_shipped():
    assert (BUNDLED_TEACHER / "config.json").is_file()
    assert any(BUNDLED_TEACHER.glob("*.safetensors"))


def test_demo_runs_end_to_end(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    out = run_demo(DemoSettings(out_dir=tmp_path / "demo", steps=3, n_eval=3, train_per_task=20, jobs=2))
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "student hpd", "student sft"]
    for r in rows:
        assert set(r["eval"]) == set(TASKS)
        assert all(0.0 <= r["eval"][t]["accuracy"] <= 1.0 and r["eval"][t]["n"] == 3 for t in TASKS)
    assert rows[0]["params"] > 4 * rows[1]["params"]  # the student is several times smaller
    assert "| student hpd |" in (out / "results.md").read_text()
    assert (out / "plots" / "dynamics.png").stat().st_size > 0
    assert (out / "runs" / "hpd" / "final" / "config.json").is_file()
    # A second demo reuses the finished runs: nothing is trained again.
    before = (out / "runs" / "hpd" / "metrics.jsonl").stat().st_mtime
    run_demo(DemoSettings(out_dir=tmp_path / "demo", steps=3, n_eval=3, train_per_task=20))
    assert (out / "runs" / "hpd" / "metrics.jsonl").stat().st_mtime == before


def test_demo_without_teacher_says_how_to_build_one(tmp_path):
    with pytest.raises(HPDError, match="scripts/build_teacher.sh"):
        run_demo(DemoSettings(out_dir=tmp_path, teacher=tmp_path / "nope"))


def test_bench_smoke(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    out = run_bench(BenchSettings(out_dir=tmp_path / "bench", methods=["sft", "hpd", "orkl (on-policy)"], seeds=[0],
                                  steps=3, n_eval=3, train_per_task=20, overrides=["optim.lr=0.002"]))
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"sft", "hpd", "orkl (on-policy)"}
    table = (out / "results.md").read_text()
    for label in summary:
        assert f"| {label} |" in table
    # Costs are measured: only on-policy runs generate, sft never runs the teacher for its loss.
    assert summary["orkl (on-policy)"][0]["generated_tokens"] > 0
    assert summary["hpd"][0]["generated_tokens"] == 0
    assert summary["sft"][0]["teacher_tokens"] == 0 < summary["hpd"][0]["teacher_tokens"]
    # CPU time is recorded beside wall time (the cost figure that survives shared cores).
    assert all(0 < r[0]["cpu_s"] for r in summary.values())
    assert "| seeds |" in table and "| CPU s |" in table
    # --set overrides reach every run, after the method's own settings.
    import yaml

    for run in (out / "runs").glob("*-s0"):
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.002
    assert "overrides optim.lr=0.002" in table
    # --report tabulates the finished runs without training: a method never run is left out.
    again = run_bench(BenchSettings(out_dir=tmp_path / "bench", methods=["sft", "fkl"], seeds=[0], steps=3, n_eval=3,
                                    train_per_task=20, overrides=["optim.lr=0.002"], report_only=True))
    assert set(json.loads((again / "results.json").read_text())) == {"sft"}
    assert not (tmp_path / "bench" / "runs" / "fkl-s0").exists()


def test_bench_rejects_unknown_methods(tmp_path):
    with pytest.raises(HPDError, match="unknown bench method"):
        run_bench(BenchSettings(out_dir=tmp_path, methods=["nope"]))
    assert "gkd (jsd mixed 0.5)" in METHODS
    # `hpd bench --methods` is a comma-separated list: no label may contain a comma.
    assert not [m for m in METHODS if "," in m]


def test_loss_spikes():
    assert loss_spikes([1.0] * 20) == 0
    assert loss_spikes([1.0] * 12 + [2.0] + [1.0] * 5) == 1
    assert loss_spikes([1.0] * 12 + [1.4]) == 0
