"""FSDP2 on CPU (gloo), launched as a user would: `accelerate launch --config_file
configs/accelerate/fsdp-cpu-2proc.yaml -m hpd.apps.cli train ...`.

- 2 processes under FSDP give the loss curve of 1 plain process with the same global batch. With
  `fkl` every quantity is deterministic, so the curves agree to float32 reduction-order noise: we
  require 1e-5 relative on the loss and 1e-4 on the grad norm, step by step (measured: about 1e-7),
  and the final weights to 1e-5 (measured 2e-6).
- The student is really sharded: each process's checkpoint shard holds half the rows of every
  decoder-layer weight, and rank 0 holds half of the student's parameters.
- A sharded checkpoint is refused by another number of processes.
- SIGKILL of the whole job mid-run, then resume under FSDP: the final weights and the losses of
  the uninterrupted FSDP run (1e-6; the same processes, the same order of operations).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpd.training.checkpoint import latest_checkpoint, load_state

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
COMMON = ["log.progress=false", "data.eval_fraction=0", "log.eval_every=0", "data.max_length=48", "objective.name=fkl",
          "log.tensorboard=off"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(processes: int, overrides: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "hpd.apps.cli", "train", "configs/tiny.yaml", *COMMON, *overrides]
    return [ACCELERATE, "launch", "--config_file", "configs/accelerate/fsdp-cpu-2proc.yaml", "--num_processes",
            str(processes), "--main_process_port", str(_free_port()), "-m", "hpd.apps.cli", "train", "configs/tiny.yaml",
            *COMMON, *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train(processes: int, overrides: list[str]) -> None:
    res = subprocess.run(_cmd(processes, overrides), cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]


def _metrics(run: Path) -> list[dict]:
    from hpd.training.metrics_file import read_records

    return read_records(run / "metrics.jsonl")  # as the run stands: restart markers applied


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_two_fsdp_processes_shard_the_student_and_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _train(1, [f"output_dir={one}", "optim.batch_size=8", "max_steps=6", "save.every=0"])
    _train(2, [f"output_dir={two}", "optim.batch_size=4", "max_steps=6", "save.every=3", "save.keep_last=1"])

    info = _metrics(two)[0]
    assert info["type"] == "info" and info["world_size"] == 2 and info["fsdp"] is True
    assert info["student_parameters_local"] == info["student_parameters"] // 2  # every tensor's rows halve here
    a = [r for r in _metrics(one) if r["type"] == "train"]
    b = [r for r in _metrics(two) if r["type"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)

    # final/ is a plain HF directory, gathered on rank 0: the weights of the 1-process run.
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)

    # The checkpoint is sharded: no whole model, and each process's shard holds half the rows of
    # every decoder-layer weight (FSDP2 shards dim 0), its optimizer moments likewise.
    ckpt = latest_checkpoint(two)
    assert not (ckpt / "model").exists()
    for rank in (0, 1):
        shard = load_state(ckpt, f"shards/rank{rank}")
        for name, full in w1.items():
            local = shard["model"][name]
            assert local.shape == (full.shape[0] // 2, *full.shape[1:]), name
        moments = [s["exp_avg"] for s in shard["optimizer"]["state"].values()]
        assert moments and all(m.shape[0] * 2 in {w.shape[0] for w in w1.values()} for m in moments)
    # The two halves are different rows of the same tensor: together, the step's weights.
    q = "model.layers.0.self_attn.q_proj.weight"
    halves = [load_state(ckpt, f"shards/rank{r}")["model"][q] for r in (0, 1)]
    assert not torch.equal(halves[0], halves[1])

    # A sharded checkpoint resumes with the processes that wrote it only: one process is refused.
    res = subprocess.run(_cmd(1, [f"output_dir={two}", "optim.batch_size=4", "max_steps=7"]), cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 2 and "written by 2 processes, this run has 1" in res.stderr, res.stderr[-2000:]


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in their own sessions)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in reversed(procs):  # workers first, so the launcher cannot react
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _start_and_kill(cmd: list[str], run_dir: Path, timeout: float = 240.0) -> int:
    """Start the 2-process job; SIGKILL all of it once a checkpoint exists and a later step was logged."""
    out = (run_dir.parent / f"{run_dir.name}.out").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.poll() is None, "the run ended before it could be killed mid-way"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            ckpt = latest_checkpoint(run_dir)
            if ckpt is not None and (run_dir / "metrics.jsonl").exists():
                step = int(ckpt.name.split("-")[1])
                lines = (run_dir / "metrics.jsonl").read_text().splitlines()
                steps = [json.loads(x).get("step", 0) for x in lines[:-1]]  # the last line may be half-written
                if any(s > step for s in steps):
                    _kill_tree(proc.pid)  # the launcher and both workers, like a lost node
                    break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
        proc.wait(timeout=60)
        out.close()
    assert not (run_dir / "final").exists(), "the run had finished: the kill did not land mid-way"
    return int(latest_checkpoint(run_dir).name.split("-")[1])


@pytest.mark.slow
def test_killed_fsdp_run_resumes_to_the_uninterrupted_fsdp_run(tmp_path):
    common = ["optim.batch_size=4", "max_steps=24", "save.every=4", "save.keep_last=2", "resume=auto"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _train(2, [f"output_dir={reference}", *common])
    killed_at = _start_and_kill(_cmd(2, [f"output_dir={killed}", *common]), killed)
    assert 0 < killed_at < 24
    res = subprocess.run(_cmd(2, [f"output_dir={killed}", *common]), cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / f'step-{killed_at:08d}'} at step {killed_at}" in res.stdout, res.stdout[-2000:]

    w_ref, w_res = _weights(reference), _weights(killed)
    for name in w_ref:
        torch.testing.assert_close(w_res[name], w_ref[name], rtol=0, atol=1e-6, msg=name)
    a = [r for r in _metrics(reference) if r["type"] == "train"]
    b = [r for r in _metrics(killed) if r["type"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-7), x["step"]


@pytest.mark.parametrize("override, kind, message", [
    ("regime.name=student", "DistributedType.FSDP", "regime.name=student runs the student outside"),
    ("regime.name=mixed", "DistributedType.FSDP", "regime.name=mixed runs the student outside"),
    ("student.lora_rank=4", "DistributedType.FSDP", "lora_rank > 0 under FSDP"),
    ("regime.name=student", "DistributedType.DEEPSPEED", "DeepSpeed is not supported"),
])
def test_what_fsdp_does_not_do_yet_is_refused_with_a_message(override, kind, message):
    from hpd.config import load_config
    from hpd.training.distributed import check_supported
    from hpd.errors import HPDError

    cfg = load_config(str(ROOT / "configs/tiny.yaml"), [override])
    with pytest.raises(HPDError, match=message):
        check_supported(cfg, kind)
    check_supported(cfg, "DistributedType.MULTI_CPU")  # DDP runs all of them
    check_supported(load_config(str(ROOT / "configs/tiny.yaml")), "DistributedType.FSDP")  # dataset regime: fine
