"""hpd.provenance: the code that made a run, and the bench report's line on it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hpd.apps.bench_report import code_note
from hpd.provenance import code_record, describe_code, git_commit, source_digest


def _package(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "sub" / "mod.py").write_text("def f():\n    return 2\n")
    (root / "pkg" / "data.txt").write_text("not code\n")
    return root / "pkg"


def test_the_source_digest_follows_the_code_and_nothing_else(tmp_path):
    pkg = _package(tmp_path / "a")
    digest = source_digest(pkg)
    assert len(digest) == 16 and source_digest(_package(tmp_path / "b")) == digest  # any copy of the same code
    (pkg / "data.txt").write_text("changed\n")
    (pkg / "sub" / "__pycache__").mkdir()
    (pkg / "sub" / "__pycache__" / "mod.py").write_text("stale\n")
    assert source_digest(pkg) == digest
    (pkg / "sub" / "mod.py").write_text("def f():\n    return 3\n")
    assert source_digest(pkg) != digest
    (pkg / "sub" / "mod.py").write_text("def f():\n    return 2\n")
    (pkg / "sub" / "mod.py").rename(pkg / "mod.py")  # the same bytes under another name
    assert source_digest(pkg) != digest


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_git_commit_is_recorded_with_a_mark_for_edited_files(tmp_path):
    pkg = _package(tmp_path)
    assert git_commit(pkg) is None  # no checkout around it
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "pkg"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_commit(pkg) == head[:12]
    (tmp_path / "notes.txt").write_text("untracked, outside the package\n")
    assert git_commit(pkg) == head[:12]
    (pkg / "sub" / "mod.py").write_text("def f():\n    return 3\n")
    assert git_commit(pkg) == head[:12] + "+dirty"


def _run(name, *sources):
    return {"run": name, "code": [{"type": "code", "source": s, "torch": "2.13.0", "transformers": "4.0",
                                   "hpd": "0.1.0", "git": None} for s in sources]}


def test_the_report_names_the_code_and_marks_a_mix():
    one = code_note([_run("sft/lr1e-3-s0", "aaaa"), _run("hpd/lr1e-3-s0", "aaaa", "aaaa")])
    assert one == "Code: every run trained and scored by hpd 0.1.0 (source aaaa), torch 2.13.0, transformers 4.0.\n"
    # A run resumed or scored under other code counts under both versions.
    mixed = code_note([_run("sft/lr1e-3-s0", "aaaa"), _run("hpd/lr1e-3-s0", "aaaa", "bbbb"),
                       {"run": "fkl/lr1e-3-s0", "code": []}])
    assert mixed.startswith("**Code: mixed.**")
    assert "(source aaaa), torch 2.13.0, transformers 4.0: 2 runs (sft/lr1e-3-s0, hpd/lr1e-3-s0)" in mixed
    assert "(source bbbb), torch 2.13.0, transformers 4.0: 1 runs (hpd/lr1e-3-s0)" in mixed
    assert "not recorded (made before hpd recorded it): 1 runs (fkl/lr1e-3-s0)" in mixed
    # The same source under another torch is another version: kernels may round differently.
    other_torch = _run("rkl/lr1e-3-s0", "aaaa")
    other_torch["code"][0]["torch"] = "2.14.0"
    assert code_note([_run("sft/lr1e-3-s0", "aaaa"), other_torch]).startswith("**Code: mixed.**")
    assert code_note([{"run": "sft/lr1e-3-s0", "code": []}]).startswith("Code: not recorded")
    assert code_note([]) == ""


def test_this_process_records_its_own_code():
    rec = code_record()
    assert rec["source"] == source_digest() and describe_code(rec).startswith(f"hpd {rec['hpd']} (source {rec['source']}")
