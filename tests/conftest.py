"""Shared fixtures: the repository root and a tiny teacher trained once per session."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The tiny teacher: configs/tiny-teacher.yaml made smaller (it trains in a couple of seconds).
# It has the students' default size but its own initialisation (student.init_seed), so no
# student starts out as a copy of the teacher's random init.
TEACHER_OVERRIDES = [
    "max_steps=120",
    "student.tiny_layers=2",
    "student.tiny_hidden=64",
    "student.tiny_intermediate=128",
    "student.init_seed=1234",
    "data.max_length=48",
    "data.eval_fraction=0.125",  # the same held-out rows as the students (same seed)
    "optim.batch_size=16",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=off",
    "save.every=0",
]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block.

    Tiny models gain nothing from intra-op threads, and on a small machine shared with other jobs
    two spinning OpenMP threads per process make a run tens of times slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """`one_torch_thread` for a whole test module: `pytestmark = pytest.mark.usefixtures(...)`."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root: config and data paths in configs/*.yaml are relative to it."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, repo_root) -> Path:
    """`final/` of a tiny teacher trained with SFT (teacher.path=none) on examples/tiny.jsonl.

    Checked to be far better than a random model on the held-out rows, so that distilling from it
    is meaningful.
    """
    from hpd.config import load_config
    from hpd.training.trainer import train

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.chdir(repo_root)
        train(load_config("configs/tiny-teacher.yaml", [f"output_dir={run_dir}", *TEACHER_OVERRIDES]))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if r["type"] == "eval"]
    ce = evals[-1]["ce"]
    random_ce = math.log(263)  # a uniform guess over the byte tokenizer
    assert ce < 0.4 * random_ce, f"the tiny teacher did not learn: held-out ce {ce:.3f} (random {random_ce:.3f})"
    return run_dir / "final"


# --------------------------------------------------------------------------------------------
# A real inference engine (vLLM), started on 127.0.0.1 from the engine environment (`make engine`)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def start_engine() -> Iterator:
    """`start_engine(model_dir, **EngineServer kwargs)` -> a started `hpd.engine.EngineServer` on a
    free port of 127.0.0.1, stopped (its process group killed) at the end of the session. Skipped
    when the engine environment is absent."""
    from hpd.engine import EngineServer, engine_python

    if engine_python(required=False) is None:
        pytest.skip("the vLLM engine environment is absent: build it with `make engine` (or set HPD_ENGINE_PYTHON)")
    servers = []

    def start(model, **kwargs):
        kwargs.setdefault("threads", 1)
        kwargs.setdefault("kv_cache_gib", 0.5)  # the engine's default (4 GiB on a CPU) is more than a shared test machine has
        server = EngineServer(model, **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def teacher_server(start_engine, repo_root):
    """The bundled teacher (hpd/assets/teacher) served by vLLM in float32, every token's
    log-probability available (max_logprobs = its vocabulary, 264)."""
    return start_engine(repo_root / "hpd" / "assets" / "teacher", max_model_len=256, max_logprobs=264, kv_cache_gib=0.25,
                        extra_args=["--enforce-eager"])  # no compilation: it starts in about half the time


@contextlib.contextmanager
def interrupted_at_step(monkeypatch, step: int) -> Iterator[None]:
    """Inside the block a run is interrupted (KeyboardInterrupt) as it starts optimizer step
    `step` (1-based), after the steps before it and their checkpoints; after it, runs train again."""
    import hpd.training.trainer

    real_step = hpd.training.trainer.Trainer.train_step

    def dies(self):
        if self.step == step - 1:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(hpd.training.trainer.Trainer, "train_step", dies)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(hpd.training.trainer.Trainer, "train_step", real_step)
