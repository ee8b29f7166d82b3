"""Checkpoints of a training run, written atomically, found again on resume.

A checkpoint is a directory `RUN_DIR/checkpoints/step-00000100/` holding

    model/             the student as a plain HF directory (safetensors + config + tokenizer)
    trainer_state.pt   optimizer, scheduler, step, data order, counters
    rng-rank{r}.pt     every RNG state of process r (python, numpy, torch, cuda)
    config.yaml        the resolved config of the run

It is assembled in `checkpoints/.tmp-step-00000100/` and renamed into place only when complete, so
a run killed at any moment leaves either no checkpoint for that step or a whole one. Older
checkpoints beyond `keep_last` are then deleted.

    >>> import tempfile, pathlib
    >>> from hpd.checkpoint import checkpoint_dirs, latest_checkpoint
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    >>> (run / "checkpoints" / "step-00000004" / "trainer_state.pt").touch()
    >>> latest_checkpoint(run).name
    'step-00000004'
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hpd.errors import HPDError

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.pt"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, per the `resume` setting (auto | never | a path)."""
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume == "never":
        if checkpoint_dirs(run_dir):
            raise HPDError(
                f"{run_dir} already holds checkpoints and resume=never: pick another output_dir, "
                "delete the old run, or set resume=auto to continue it"
            )
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise HPDError(f"resume={resume!r}: no checkpoint there (expected {path / STATE_FILE}); use auto, never or a checkpoint dir")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, *, rank: int, is_main: bool, barrier: Callable[[], None],
                    write_main: Callable[[Path], None], keep_last: int) -> Path:
    """Write checkpoint `step` atomically; every process calls this.

    write_main: called on the main process with the temporary directory to write the model, the
    trainer state and the config into. Every process writes its own RNG state.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if is_main:
        write_main(tmp)
    barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def load_rng_state(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise HPDError(f"checkpoint {ckpt} has no RNG state for process {rank}: resume with the number of processes it was saved with")
    set_rng_state(torch.load(path, map_location="cpu", weights_only=False))


def load_student_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load the checkpoint's safetensors into `model` (same architecture), in place."""
    from safetensors.torch import load_file

    files = sorted((ckpt / "model").glob("*.safetensors"))
    if not files:
        raise HPDError(f"checkpoint {ckpt} has no model weights (model/*.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    from hpd.models import is_peft_model

    if is_peft_model(model):  # a LoRA student's checkpoint holds its adapters only
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise HPDError(f"checkpoint {ckpt} does not match the student's adapters (unexpected "
                           f"{result.unexpected_keys[:5]}): resume with the student config it was saved with")
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. lm_head = embeddings) are saved once; anything else missing is an error.
    params = dict(model.named_parameters(remove_duplicate=False))
    ptrs = {p.data_ptr() for n, p in params.items() if n in state}
    real_missing = [k for k in missing if k not in params or params[k].data_ptr() not in ptrs]
    if unexpected or real_missing:
        raise HPDError(
            f"checkpoint {ckpt} does not match the student model (missing {real_missing[:5]}, unexpected "
            f"{unexpected[:5]}): resume with the student config it was saved with"
        )
