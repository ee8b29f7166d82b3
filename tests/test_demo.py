"""`hpd demo` end to end, in a fast setting, on the bundled teacher and pretrained student."""

from __future__ import annotations

import json

import pytest

from hpd.apps.demo import BUNDLED_TEACHER, DEMO_BASELINE, READINGS, TASKS, DemoSettings, run_demo
from hpd.errors import HPDError


def test_bundled_teacher_is_shipped():
    assert (BUNDLED_TEACHER / "config.json").is_file()
    assert any(BUNDLED_TEACHER.glob("*.safetensors"))


def test_demo_runs_end_to_end(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    out = run_demo(DemoSettings(out_dir=tmp_path / "demo", steps=3, n_eval=4, train_per_task=20, seeds=(0, 1), jobs=2))
    rows = json.loads((out / "results.json").read_text())
    names = [r.get("name") for r in rows[:-1]]
    assert names == ["teacher", "initial student", "student hpd", f"student {DEMO_BASELINE}"]
    for r in rows[:-1]:
        assert set(r["eval"]) == set(TASKS)
        assert all(0.0 <= r["eval"][t] <= 1.0 for t in TASKS)
    assert [r["seeds"] for r in rows[2:4]] == [2, 2]
    # The paired difference with its interval is printed and saved.
    assert rows[-1]["paired"].count("[") == 1
    text = (out / "results.md").read_text()
    assert "| student hpd |" in text and "paired-bootstrap interval" in text
    assert READINGS in text
    assert (out / "plots" / "dynamics.png").stat().st_size > 0
    assert not list((out / "runs").rglob("eval-curve-step*.json"))  # the demo scores final students only
    # A second demo reuses the finished runs: nothing is trained again.
    runs = list((out / "runs").rglob("metrics.jsonl"))
    before = {p: p.stat().st_mtime for p in runs}
    run_demo(DemoSettings(out_dir=tmp_path / "demo", steps=3, n_eval=4, train_per_task=20, seeds=(0, 1)))
    assert before == {p: p.stat().st_mtime for p in runs}
    # Other settings in the same directory are refused, never mixed with what is there.
    with pytest.raises(HPDError, match=r"other settings \(data\.n_val: 4 -> 5, data\.n_eval: 4 -> 5\)"):
        run_demo(DemoSettings(out_dir=tmp_path / "demo", steps=3, n_eval=5, train_per_task=20, seeds=(0, 1)))
    with pytest.raises(HPDError, match=r"finished run .* another config .*max_steps: 3 -> 4"):
        run_demo(DemoSettings(out_dir=tmp_path / "demo", steps=4, n_eval=4, train_per_task=20, seeds=(0, 1)))
    assert before == {p: p.stat().st_mtime for p in runs}


def test_demo_without_teacher_says_how_to_build_one(tmp_path):
    with pytest.raises(HPDError, match="scripts/build_teacher.sh"):
        run_demo(DemoSettings(out_dir=tmp_path, teacher=tmp_path / "nope"))


def test_the_demo_points_at_a_heading_of_the_results(repo_root):
    """The closing line's link is a heading of benchmarks/RESULTS.md (slugged as the docs site and
    GitHub slug it), so a renamed section cannot leave the demo pointing nowhere."""
    from markdown.extensions.toc import slugify  # the docs site's own heading ids

    path, anchor = READINGS.split("#")
    headings = [line.lstrip("#").strip() for line in (repo_root / path).read_text().splitlines() if line.startswith("## ")]
    slugs = {slugify(h, "-") for h in headings}
    assert anchor in slugs
