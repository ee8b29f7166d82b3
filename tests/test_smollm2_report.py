"""benchmarks/smollm2_report.py --keep: a model is measured once, its row outlives its weights, and a
retrained run (or another setting) is measured again. Tiny models stand in for SmolLM2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _report(repo_root, runs, teacher, keep) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(repo_root / "benchmarks" / "smollm2_report.py"), "--runs", str(runs), "--teacher", str(teacher),
           "--heldout", str(repo_root / "examples" / "tiny.jsonl"), "--n", "4", "--samples", "1", "--sample-capitals", "1",
           "--gen-tokens", "4", "--keep", str(keep)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _measured(res: subprocess.CompletedProcess) -> list[str]:
    """The models a report measured (rather than read from --keep), without their layer counts."""
    return [re.sub(r" \(\d+ layers\)", "", line.split(" in ")[0].removeprefix("measured "))
            for line in res.stderr.splitlines() if line.startswith("measured ")]


def test_kept_rows_are_reused_outlive_their_weights_and_a_retrained_run_is_measured_again(tmp_path, tiny_teacher, repo_root):
    from hpd.config import load_config
    from hpd.training.trainer import train

    runs, keep = tmp_path / "runs", tmp_path / "keep"
    run = runs / "every2" / "hpd"
    train(load_config(str(repo_root / "configs" / "tiny.yaml"), [
        f"output_dir={run}", f"teacher.path={tiny_teacher}", f"student.path={tiny_teacher}", "max_steps=2",
        f"data.train={repo_root / 'examples' / 'tiny.jsonl'}", "log.eval_every=0", "log.progress=false"]))

    first = _report(repo_root, runs, tiny_teacher, keep)
    assert _measured(first) == ["teacher", "every2 initial", "every2 hpd"]
    assert sorted(p.name for p in keep.iterdir()) == ["every2-hpd.json", "every2-initial.json", "teacher-teacher.json"]
    row = json.loads((keep / "every2-hpd.json").read_text())
    assert row["steps"] == 2 and row["capitals_n"] == 4 and 0 < row["generation_ratio"]

    again = _report(repo_root, runs, tiny_teacher, keep)  # nothing new: every row kept, the same tables
    assert _measured(again) == [] and again.stdout == first.stdout

    # Another attempt of the run (its last logged step differs): measured again, the others kept.
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line][-1]
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({**last, "step": 3}) + "\n")
    assert _measured(_report(repo_root, runs, tiny_teacher, keep)) == ["every2 hpd"]

    # Its weights gone (a fresh machine): the kept row stays in the table.
    shutil.rmtree(run / "final")
    gone = _report(repo_root, runs, tiny_teacher, keep)
    assert _measured(gone) == [] and re.search(r"^\| every2 \(\d+ layers\) hpd \| 3 \|", gone.stdout, re.M)
