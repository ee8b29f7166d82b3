"""Runs and checkpoints under attack and failure: nothing lost, nothing mixed, nobody in.

- checkpoints hold no pickle (a crafted one is refused, its payload never runs), match their
  manifest (a damaged newest one is skipped for the previous), and resume bitwise;
- a resume with a changed config is refused, or recorded when allowed; max_steps changes state
  what the schedule does;
- one run per output_dir (an OS lock; a killed holder's lock is taken over);
- bad output dirs, full disks, file-size limits, kills during writes and pruning end in a
  one-line message and a clean directory.

Most runs are tiny SFT runs in-process (seconds); a real `hpd train` subprocess where a kill, a lock
held by another process, a resource limit or a mount namespace is the point.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hpd.training.checkpoint import (
    MANIFEST, _discard, checkpoint_dirs, clean_leftovers, latest_checkpoint, load_state, prune, save_state, verify_checkpoint,
)
from hpd.apps.cli import app
from hpd.config import load_config
from hpd.errors import HPDError
from hpd.training.run_dir import HOLDER_FILE, LOCK_FILE, RunDirLock
from hpd.training.trainer import lr_lambda, train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_torch_thread")

# A tiny SFT run without a teacher: the checkpoint and resume machinery, fast.
BASE = ["data.max_length=48", "log.progress=false", "log.tensorboard=off", "log.every=1",
        "teacher.path=none", "objective.name=sft", "max_steps=6", "save.every=2", "save.keep_last=5"]
LOCK_FILES = {LOCK_FILE, HOLDER_FILE}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


def cfg(out: Path, *overrides: str):
    return load_config("configs/tiny.yaml", [*BASE, f"output_dir={out}", *overrides])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` but the lock files -> (size, mtime_ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.name not in LOCK_FILES}


def records(run_dir: Path) -> list[dict]:
    from hpd.training.metrics_file import read_records

    return read_records(run_dir / "metrics.jsonl")  # as the run stands: restart markers applied


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, repo_root) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6 (never modified: tests copy it)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo_root)
        train(cfg(run))
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000004", "step-00000006"]
    return run


@pytest.fixture
def run(saved_run, tmp_path) -> Path:
    """A copy of `saved_run` to damage."""
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def keep_only(run: Path, step: int) -> Path:
    """Drop every checkpoint after `step` and final/: the run as a kill after `step` leaves it."""
    for d in checkpoint_dirs(run):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    shutil.rmtree(run / "final")
    return run / "checkpoints" / f"step-{step:08d}"


# --------------------------------------------------------------------------------------------
# No pickles: JSON + safetensors, a manifest; old .pt checkpoints only under weights_only
# --------------------------------------------------------------------------------------------


def test_state_round_trip_is_exact(tmp_path):
    state = {"step": 7, "opt": {0: {"exp_avg": torch.randn(3, 2), "step": torch.tensor(4.0)},
                                1: {"half": torch.randn(4, dtype=torch.bfloat16)}},
             "betas": (0.9, 0.999), "rng": ("MT19937", np.arange(624, dtype=np.uint32), 3, 0, 0.0),
             "__tensor__": "a key spelled like a marker", "nan": float("nan"), "none": None, "flag": True,
             "ints": torch.arange(5)}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["opt"][0]["exp_avg"].equal(state["opt"][0]["exp_avg"])
    assert back["opt"][1]["half"].dtype == torch.bfloat16 and back["opt"][1]["half"].equal(state["opt"][1]["half"])
    assert back["opt"][0]["step"].shape == () and back["ints"].equal(torch.arange(5))
    assert back["betas"] == (0.9, 0.999) and back["__tensor__"] == state["__tensor__"]
    assert back["rng"][0] == "MT19937" and back["rng"][1].dtype == np.uint32 and (back["rng"][1] == np.arange(624)).all()
    assert back["none"] is None and back["flag"] is True and back["nan"] != back["nan"]
    with pytest.raises(TypeError, match="cannot store a object"):
        save_state({"x": object()}, tmp_path, "t")


def test_checkpoints_are_json_and_safetensors_with_a_manifest(saved_run):
    for ckpt in checkpoint_dirs(saved_run):
        assert verify_checkpoint(ckpt) is None
        files = [p for p in ckpt.rglob("*") if p.is_file()]
        assert {p.suffix for p in files} <= {".json", ".safetensors", ".yaml", ".jinja"}
        for p in files:
            head = p.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{p} looks like a pickle or a torch zip"
        manifest = json.loads((ckpt / MANIFEST).read_text())
        assert set(manifest["files"]) == {str(p.relative_to(ckpt)) for p in files if p.name != MANIFEST}


def to_legacy(ckpt: Path) -> None:
    """Rewrite `ckpt` as hpd wrote checkpoints before this format: torch.save pickles, no manifest."""
    torch.save(load_state(ckpt, "trainer_state"), ckpt / "trainer_state.pt")
    torch.save(load_state(ckpt, "rng-rank0"), ckpt / "rng-rank0.pt")
    for name in ("trainer_state.json", "trainer_state.safetensors", "rng-rank0.json", "rng-rank0.safetensors", MANIFEST):
        (ckpt / name).unlink()


def test_a_checkpoint_of_the_old_format_resumes_safely_to_the_same_weights(run, saved_run, capsys):
    ckpt = keep_only(run, 2)
    to_legacy(ckpt)
    train(cfg(run))
    assert f"resumed from {ckpt} at step 2" in capsys.readouterr().out
    assert_same_weights(run / "final", saved_run / "final")


class _Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("resume", ["auto", "path"])
@pytest.mark.parametrize("planted", ["trainer_state.pt", "rng-rank0.pt"])
def test_a_pickle_payload_in_a_checkpoint_is_never_executed(run, tmp_path, planted, resume):
    ckpt = keep_only(run, 2)
    to_legacy(ckpt)
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "x": _Payload(marker)}, ckpt / planted)
    with pytest.raises(HPDError) as err:
        train(cfg(run, f"resume={ckpt if resume == 'path' else 'auto'}"))
    assert not marker.exists(), "the payload ran"
    msg = str(err.value)
    assert f"{ckpt / planted}" in msg and "outside the safe allow-list" in msg and "new output_dir" in msg
    assert not (run / "final").exists()
    # The payload is real: an unsafe load runs it (so the assertion above can fail).
    torch.load(ckpt / planted, weights_only=False)
    assert marker.exists()


def test_a_pickle_planted_in_a_new_checkpoint_is_never_read(run, saved_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    newest = run / "checkpoints" / "step-00000006"
    torch.save({"x": _Payload(marker)}, newest / "trainer_state.pt")
    shutil.rmtree(run / "final")
    train(cfg(run))
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged (trainer_state.pt is not in its manifest" in out
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'} at step 4" in out
    assert not marker.exists()
    assert_same_weights(run / "final", saved_run / "final")


# --------------------------------------------------------------------------------------------
# A damaged newest checkpoint: skipped for the previous one
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["model/model.safetensors", "trainer_state.safetensors", "trainer_state.json",
                                     "rng-rank0.json"])
def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous(run, saved_run, damaged, capsys):
    newest = run / "checkpoints" / "step-00000006"
    data = (newest / damaged).read_bytes()
    (newest / damaged).write_bytes(data[: len(data) // 2])
    shutil.rmtree(run / "final")
    train(cfg(run))
    out = capsys.readouterr().out
    assert f"warning: checkpoint {newest} is damaged ({damaged} has {len(data) // 2} bytes, {len(data)} were written" in out
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'} at step 4" in out
    assert_same_weights(run / "final", saved_run / "final")
    assert verify_checkpoint(newest) is None  # written again by the resumed run


def test_a_damaged_checkpoint_named_by_path_is_an_error(run):
    newest = run / "checkpoints" / "step-00000006"
    (newest / "trainer_state.json").write_text('{"format": 2, "state": {"step": 600}}')
    with pytest.raises(HPDError, match=r"the checkpoint is damaged \(trainer_state.json .* \(truncated or altered\)\)"):
        train(cfg(run, f"resume={newest}"))


def test_no_intact_checkpoint_is_an_error_that_deletes_nothing(run):
    for ckpt in checkpoint_dirs(run):
        (ckpt / "model" / "model.safetensors").write_bytes(b"")
    before = snapshot(run)
    with pytest.raises(HPDError, match=r"no intact checkpoint in .*step-00000006: model/model.safetensors has 0 bytes"):
        train(cfg(run))
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------
# resume=auto with another config
# --------------------------------------------------------------------------------------------


def test_a_changed_run_is_refused_with_the_differing_keys(run):
    before = snapshot(run)
    with pytest.raises(HPDError) as err:
        train(cfg(run, "optim.lr=0.01", "objective.name=fkl", "teacher.path=tiny", "seed=3", "log.every=3"))
    msg = str(err.value)
    for change in ("optim.lr: 0.003 -> 0.01", "objective.name: 'sft' -> 'fkl'", "teacher.path: 'none' -> 'tiny'",
                   "seed: 0 -> 3", "another output_dir", "resume_allow_changes=true"):
        assert change in msg
    assert "log.every" not in msg  # how often metrics are logged does not change the run
    assert snapshot(run) == before


def test_a_changed_run_through_the_cli_is_one_error_line(run):
    result = runner.invoke(app, ["train", "configs/tiny.yaml", *BASE, f"output_dir={run}", "optim.batch_size=4"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: the config differs") and result.stderr.count("\n") == 1
    assert "optim.batch_size: 8 -> 4" in result.stderr and "Traceback" not in result.output


def test_neutral_keys_may_change(run, capsys):
    shutil.rmtree(run / "final")
    train(cfg(run, "log.every=2", "log.eval_every=0", "save.keep_last=1", "save.every=3", "optim.max_bad_steps=9"))
    assert "resumed from" in capsys.readouterr().out
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["save.keep_last"] == [5, 1]


def test_allowed_changes_take_effect_and_are_recorded(run, capsys):
    ckpt = keep_only(run, 4)
    c = cfg(run, "optim.lr=0.01", "optim.weight_decay=0.1", "resume_allow_changes=true")
    train(c)
    out = capsys.readouterr().out
    assert "warning: resumed with a changed config (resume_allow_changes=true): optim.lr: 0.003 -> 0.01" in out
    step5 = next(r for r in records(run) if r.get("type") == "train" and r["step"] == 5)
    assert step5["lr"] == pytest.approx(0.01 * lr_lambda(c)(4), rel=1e-12)  # the new lr, never the old one
    resume = [r for r in records(run) if r["type"] == "resume"]
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    for rec in (resume[-1], history[-1]):
        assert rec["checkpoint"] == str(ckpt) and rec["step"] == 4
        assert rec["changes"]["optim.lr"] == [0.003, 0.01] and rec["changes"]["optim.weight_decay"] == [0.0, 0.1]
    state = load_state(run / "checkpoints" / "step-00000006", "trainer_state")
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.1, 0.0]
    assert state["scheduler"]["base_lrs"] == [0.01, 0.01]


def test_extending_max_steps_states_the_schedule_and_follows_it(run, capsys):
    c = cfg(run, "max_steps=10")
    train(c)
    out = capsys.readouterr().out
    old = cfg(run)
    before, after = 0.003 * lr_lambda(old)(6), 0.003 * lr_lambda(c)(6)
    assert (f"note: the learning-rate schedule (cosine, warmup_ratio 0.1, peak lr 0.003) is recomputed over "
            f"max_steps=10 (was 6) as if the run had been planned so from the start: at step 6 the lr goes from "
            f"{before:.6g} (the checkpoint's schedule) to {after:.6g}") in out
    lrs = {r["step"]: r["lr"] for r in records(run) if r["type"] == "train"}
    assert [lrs[s] for s in (7, 8, 9, 10)] == pytest.approx([0.003 * lr_lambda(c)(s) for s in (6, 7, 8, 9)], rel=1e-12)
    assert json.loads((run / "config_history.jsonl").read_text().splitlines()[-1])["changes"] == {"max_steps": [6, 10]}


def test_max_steps_below_the_checkpoint_is_refused(run):
    with pytest.raises(HPDError, match=r"max_steps=3 is below the step of the checkpoint to resume from .* step 6"):
        train(cfg(run, "max_steps=3"))


# --------------------------------------------------------------------------------------------
# One run per output_dir
# --------------------------------------------------------------------------------------------


def test_a_second_run_into_a_held_directory_fails_at_once(tmp_path):
    held = RunDirLock(tmp_path / "run")
    held.acquire()
    try:
        with pytest.raises(HPDError, match=rf"'{tmp_path / 'run'}' is in use by another hpd run \(pid {os.getpid()} on "
                                           r".*, started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)"):
            train(cfg(tmp_path / "run"))
    finally:
        held.release()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, repo_root, capsys):
    """A real `hpd train` holds the directory; a second run is refused naming its pid; SIGKILL; then
    the directory is free again and the next run says whose lock it took over."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", *BASE, f"output_dir={run}",
           "max_steps=100000", "save.every=0"]
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / HOLDER_FILE).is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        result = runner.invoke(app, ["train", "configs/tiny.yaml", *BASE, f"output_dir={run}", "max_steps=100000",
                                     "save.every=0"])
        assert result.exit_code == 2
        assert f"is in use by another hpd run (pid {proc.pid} on" in result.stderr
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    capsys.readouterr()
    train(cfg(run, "max_steps=2", "save.every=0"))
    assert f"the run that held it (pid {proc.pid} on" in capsys.readouterr().out
    assert not (run / HOLDER_FILE).exists()  # released at the end


# --------------------------------------------------------------------------------------------
# Bad output directories: one line, exit 2, nothing created
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["is-a-file", "parent-is-a-file"])
def test_an_unusable_output_dir_is_one_error_line(tmp_path, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    out = blocker if case == "is-a-file" else blocker / "run"
    result = runner.invoke(app, ["train", "configs/tiny.yaml", *BASE, f"output_dir={out}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    expected = "is a file, not a directory" if case == "is-a-file" else f"'{blocker}' is a file, not a directory"
    assert result.stderr.startswith(f"error: output_dir '{out}'") and expected in result.stderr
    with pytest.raises(HPDError, match=re.escape(expected)):  # the Python API checks it too
        train(cfg(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_text() == "a file\n"


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt && echo ok"], capture_output=True, text=True)
    return probe.stdout.strip() == "ok"


UNSHARE = _unshare_works()


def _in_mount_namespace(tmp_path: Path, mount_opts: str, hpd_args: list[str]) -> subprocess.CompletedProcess:
    """Run `hpd train` with a fresh tmpfs (mount_opts) at tmp_path/mnt, in a user+mount namespace;
    prints `rc=N` and what the tmpfs holds afterwards (it vanishes with the namespace)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    train_cmd = " ".join([sys.executable, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", *hpd_args])
    script = (f"mount -t tmpfs -o {mount_opts} tmpfs {mnt} && {{ {train_cmd}; echo rc=$?; "
              f"find {mnt} -mindepth 1 | sort; }}")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          cwd=Path(__file__).resolve().parents[1], env=env(), capture_output=True, text=True, timeout=300)


def test_an_output_dir_that_is_not_writable_is_one_error_line(tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            result = runner.invoke(app, ["train", "configs/tiny.yaml", *BASE, f"output_dir={ro / 'run'}"])
        finally:
            ro.chmod(0o700)
        assert result.exit_code == 2 and result.stderr.startswith(f"error: output_dir '{ro / 'run'}' is not writable")
        assert list(ro.iterdir()) == []
        return
    if not UNSHARE:
        pytest.skip("running as root and no unprivileged mount namespace: a read-only directory cannot be made")
    res = _in_mount_namespace(tmp_path, "ro", [*BASE, f"output_dir={tmp_path / 'mnt' / 'run'}"])
    assert "rc=2" in res.stdout, res.stdout + res.stderr
    assert res.stderr.startswith(f"error: output_dir '{tmp_path / 'mnt' / 'run'}' is not writable") and "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------
# Full disks and file-size limits during a checkpoint write
# --------------------------------------------------------------------------------------------


def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_no_partial_dir(tmp_path, repo_root):
    run = tmp_path / "run"
    limit = 200_000  # above metrics.jsonl and config.yaml, below model.safetensors (~470 kB)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run([sys.executable, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", *BASE, f"output_dir={run}"],
                         cwd=repo_root, env=env(), capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: file too large for the file-size limit while writing checkpoint step-00000002")
    assert res.stderr.count("\n") == 1 and "partial checkpoint was removed" in res.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []
    assert not (run / "final").exists() and not (run / HOLDER_FILE).exists()


@pytest.mark.skipif(not UNSHARE, reason="no unprivileged user+mount namespace to mount a small tmpfs in")
def test_a_full_disk_during_a_checkpoint_is_one_line_and_no_partial_dir(tmp_path):
    run = tmp_path / "mnt" / "run"
    # 1 MB: the config, the log and the model (~470 kB) fit, the optimizer state (~930 kB) does not.
    res = _in_mount_namespace(tmp_path, "size=1m", [*BASE, f"output_dir={run}"])
    assert "rc=2" in res.stdout, res.stdout + res.stderr
    assert res.stderr.startswith("error: no space left on device while writing checkpoint step-00000002"), res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    left = [line for line in res.stdout.splitlines() if line.startswith(str(run))]
    assert str(run / "checkpoints") in left and not any("step-" in line for line in left), left


# --------------------------------------------------------------------------------------------
# Kills during writes and pruning
# --------------------------------------------------------------------------------------------


def test_leftovers_of_an_interrupted_write_or_prune_are_cleaned_on_start(run, capsys):
    root = run / "checkpoints"
    for name in (".tmp-step-00000008", ".trash-step-00000002"):
        (root / name / "model").mkdir(parents=True)
        (root / name / "model" / "model.safetensors").write_bytes(b"partial")
    (run / ".final.tmp-0123abcd").mkdir()
    train(cfg(run))
    out = capsys.readouterr().out
    assert ("removed what an interrupted checkpoint write or prune left: checkpoints/.tmp-step-00000008, "
            "checkpoints/.trash-step-00000002, .final.tmp-0123abcd") in out
    assert not any(p.name.startswith(".") for p in root.iterdir())


def test_a_kill_during_pruning_never_leaves_a_half_deleted_checkpoint(run, monkeypatch):
    """Deleting is rename-then-delete: interrupted after the first file, the checkpoint is already
    out of the list, and the next start removes the rest."""
    import hpd.training.checkpoint as ck

    real_rmtree = shutil.rmtree

    def rmtree_killed_midway(path, ignore_errors=False):
        if Path(path).name.startswith(".trash-") and Path(path).exists():
            next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ck.shutil, "rmtree", rmtree_killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prune(run, 6, keep_last=1)
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000004", "step-00000006"]
    assert (run / "checkpoints" / ".trash-step-00000002").is_dir()
    assert clean_leftovers(run) == ["checkpoints/.trash-step-00000002"]
    with pytest.raises(KeyboardInterrupt):  # _discard itself, on a checkpoint being replaced
        monkeypatch.setattr(ck.shutil, "rmtree", rmtree_killed_midway)
        _discard(run / "checkpoints" / "step-00000004")
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000006"]


def _kill_during_checkpoint_io(cmd: list[str], run: Path, repo_root: Path, rng: random.Random) -> str:
    """Start `cmd`, SIGKILL it at a random moment of a checkpoint write (a `.tmp-step-*` appears) or
    right after one is renamed into place (pruning follows); returns where the kill landed."""
    root = run / "checkpoints"
    target = rng.choice(["write", "prune"])
    delay = rng.uniform(0, 0.03) if target == "write" else rng.uniform(0, 0.003)
    skip = rng.randrange(0, 4)  # let a few checkpoints pass first
    seen = {p.name for p in root.iterdir()} if root.is_dir() else set()
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint activity seen"
            names = {p.name for p in root.iterdir()} if root.is_dir() else set()
            fresh = {n for n in names - seen if n.startswith(".tmp-step-" if target == "write" else "step-")}
            seen |= names
            if fresh:
                if skip == 0:
                    time.sleep(delay)
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                skip -= 1
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    return f"{target}+{delay * 1000:.1f}ms: leftovers {left or 'none'}"


def _fault_injection(trials: int, tiny_teacher: Path, tmp_path: Path, repo_root: Path, seed: int) -> None:
    # hpd on the dataset regime with a teacher: sampled tokens, so every RNG must come back right.
    steps = 10 + 4 * trials  # each trial kills within 4 checkpoints of its start
    common = [*BASE, "objective.name=hpd", f"teacher.path={tiny_teacher}", f"max_steps={steps}", "save.every=1"]
    reference = tmp_path / "reference"
    train(load_config("configs/tiny.yaml", [*common, f"output_dir={reference}", "save.keep_last=100"]))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", *common, f"output_dir={run}", "save.keep_last=2"]
    rng = random.Random(seed)
    landed = []
    for _ in range(trials):
        landed.append(_kill_during_checkpoint_io(cmd, run, repo_root, rng))
        assert not (run / "final").exists()
        ckpt = latest_checkpoint(run)
        if ckpt is None:  # killed inside the first checkpoint write: the next start begins afresh
            continue
        assert verify_checkpoint(ckpt) is None, f"after a kill ({landed[-1]}) the newest checkpoint is damaged"
        # The newest checkpoint holds exactly the weights of the uninterrupted run at that step.
        assert_same_weights(ckpt / "model", reference / "checkpoints" / ckpt.name / "model")
    print("\n".join(landed))
    train(load_config("configs/tiny.yaml", [*common, f"output_dir={run}", "save.keep_last=2"]))
    assert_same_weights(run / "final", reference / "final")
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())
    assert [(r["type"], r["step"]) for r in records(run) if r["type"] == "train"] == [
        ("train", s) for s in range(1, steps + 1)]


def test_sigkill_during_checkpoint_writes_and_pruning_resumes_bitwise(tiny_teacher, tmp_path, repo_root):
    _fault_injection(3, tiny_teacher, tmp_path, repo_root, seed=0)


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_and_pruning_many_times(tiny_teacher, tmp_path, repo_root):
    _fault_injection(20, tiny_teacher, tmp_path, repo_root, seed=1)


# --------------------------------------------------------------------------------------------
# Small things a user trips over
# --------------------------------------------------------------------------------------------


def test_skipped_rows_are_reported_on_the_console(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = Path("examples/tiny.jsonl").read_text().splitlines()[:20]
    data.write_text("\n".join(rows[:10] + ['{"prompt": "x"}', "not json"] + rows[10:]) + "\n")
    train(cfg(tmp_path / "run", f"data.train={data}", "data.on_bad_row=skip", "max_steps=1", "save.every=0"))
    out = capsys.readouterr().out
    assert f"skipped 2 malformed data rows (data.on_bad_row=skip), e.g. {data} line 11: field 'completion' is missing" in out


def _model_dir(tmp_path: Path, name: str, pad_in_config: int | None = None, pad_token: str | None = None) -> Path:
    from hpd.models.loading import build_tiny_model
    from hpd.models.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    model = build_tiny_model(tok, num_layers=1, hidden_size=32, num_heads=4)
    out = tmp_path / name
    model.save_pretrained(str(out))
    if pad_token is not None:  # a pad token the tokenizer adds past the model's rows
        tok.add_tokens([f"<x{i}>" for i in range(8)])
        tok.add_special_tokens({"pad_token": pad_token})
    tok.save_pretrained(str(out))
    if pad_in_config is not None:
        conf = json.loads((out / "config.json").read_text())
        conf["pad_token_id"] = pad_in_config
        (out / "config.json").write_text(json.dumps(conf))
    return out


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_pad_id_beyond_the_embeddings_is_a_clear_error(tmp_path, role):
    bad = _model_dir(tmp_path, "bad", pad_in_config=5000)
    with pytest.raises(HPDError, match=rf"the {role} model '{bad}': its config.json has pad_token_id 5000, beyond its "
                                       r"264 embedding rows: set pad_token_id in .*config.json to an id below 264"):
        train(cfg(tmp_path / "run", f"{role}.path={bad}", "teacher.path=none" if role == "student" else "objective.name=fkl"))
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_pad_id_beyond_the_embeddings_is_a_clear_error(tmp_path):
    bad = _model_dir(tmp_path, "bad", pad_token="<mypad>")
    with pytest.raises(HPDError, match=r"the teacher model '.*': its tokenizer's pad token '<mypad>' has id 271, beyond "
                                       r"the model's 264 embedding rows"):
        train(cfg(tmp_path / "run", f"teacher.path={bad}", "objective.name=fkl"))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_missing_model_path_says_whose(tmp_path, role):
    with pytest.raises(HPDError, match=rf"^{role} model path '{tmp_path / 'nope'}' does not exist"):
        train(cfg(tmp_path / "run", f"{role}.path={tmp_path / 'nope'}", *(["objective.name=fkl"] if role == "teacher" else [])))
