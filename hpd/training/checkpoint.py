"""Checkpoints of a training run: written atomically, verified on resume, loaded without pickles.

A checkpoint is a directory `RUN_DIR/checkpoints/step-00000100/` holding

    model/                       the student as a plain HF directory (safetensors + config + tokenizer)
    trainer_state.json           step, counters, data order, scheduler, ... (plain JSON)
    trainer_state.safetensors    the tensors of that state (optimizer moments, EMA teacher)
    rng-rank{r}.json             python and numpy RNG states of process r
    rng-rank{r}.safetensors      torch (and cuda) RNG states of process r
    rollouts-rank{r}.*           with rollout reuse, mid-batch: process r's rollout batch (json + safetensors)
    shards/rank{r}.*             FSDP runs only, instead of model/ and the optimizer moments: process
                                 r's slice of the student and of the optimizer state (hpd.training.distributed)
    config.yaml                  the resolved config of the run
    manifest.json                size and sha256 of every file above, written last

Nothing in it is a pickle, so loading a checkpoint cannot run code. It is assembled in
`checkpoints/.tmp-step-00000100/` and renamed into place only when complete, so a run killed at
any moment leaves either no checkpoint for that step or a whole one; on resume the newest one is
checked against its manifest and a damaged one (truncated, altered) is skipped for the previous.
Older checkpoints beyond `keep_last` are renamed to `.trash-step-*` before they are deleted, so a
kill during pruning never leaves a half-deleted checkpoint that looks whole; `clean_leftovers`
removes `.tmp-*` and `.trash-*` directories on the next start. A full disk or a file-size limit
during a write is a one-line error and the partial directory is removed.

Checkpoints of hpd before this format (`trainer_state.pt`, `rng-rank*.pt`) are loaded with
`torch.load(weights_only=True)` and an allow-list of the numpy types they hold; anything else in
such a file is refused with a message.

    >>> import tempfile, pathlib, torch
    >>> from hpd.training.checkpoint import load_state, save_state
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> save_state({"step": 3, "moments": {0: torch.ones(2)}, "betas": (0.9, 0.999)}, d, "state")
    >>> load_state(d, "state")
    {'step': 3, 'moments': {0: tensor([1., 1.])}, 'betas': (0.9, 0.999)}
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hpd.errors import HPDError
from hpd.files import space_error

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE = "trainer_state"
MANIFEST = "manifest.json"
LEGACY_STATE_FILE = "trainer_state.pt"
FORMAT = 2
# Leftovers of an interrupted write or prune: checkpoints/.tmp-step-*, checkpoints/.trash-*, and
# the temporary siblings of final/ (hpd.models.loading.save_model).
_LEFTOVER = re.compile(r"^(\.tmp-step-\d{8}|\.trash-.+)$")
_FINAL_LEFTOVER = re.compile(r"^\.final\.(tmp|old)-[0-9a-f]+$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(ckpt: Path) -> int:
    return int(_STEP_DIR.match(Path(ckpt).name).group(1))


def is_legacy(ckpt: Path) -> bool:
    """A checkpoint of hpd before the pickle-free format (trainer_state.pt, no manifest)."""
    return not (ckpt / MANIFEST).is_file() and (ckpt / LEGACY_STATE_FILE).is_file()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (renamed into place: a manifest, or a legacy state), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and ((p / MANIFEST).is_file() or (p / LEGACY_STATE_FILE).is_file())]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


# --------------------------------------------------------------------------------------------
# State without pickles: a JSON tree whose tensors live in a safetensors file
# --------------------------------------------------------------------------------------------
# Markers of what plain JSON cannot say. A dict that could be mistaken for one (non-string keys,
# or a key spelled like a marker) is written as a list of pairs.
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state (JSON + safetensors only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(x, tensors) for x in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__ndarray__" in obj:
            dtype = np.dtype(obj["dtype"])
            if dtype.kind not in "biuf":  # numbers only: an object array could hold anything
                raise ValueError(f"array of dtype {dtype} in a checkpoint state")
            return np.array(obj["__ndarray__"], dtype=dtype)
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state(state: Any, directory: Path, name: str) -> None:
    """Write `state` (nested dicts/lists/tuples of numbers, strings, tensors, numpy arrays) as
    `directory/name.json` + `directory/name.safetensors`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    with open(directory / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "state": tree}, f)


def load_state(directory: Path, name: str) -> Any:
    """The state `save_state` wrote; no code runs (JSON and safetensors only)."""
    from safetensors.torch import load_file

    with open(directory / f"{name}.json", encoding="utf-8") as f:
        tree = json.load(f)["state"]
    return _decode(tree, load_file(str(directory / f"{name}.safetensors")))


def _legacy_load(path: Path) -> Any:
    """A `.pt` file of an older hpd: weights_only unpickling, with the numpy types its RNG state holds."""
    from torch.serialization import safe_globals

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    reconstruct = core.multiarray._reconstruct
    allow: list[Any] = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                        type(np.dtype(np.uint32))]
    try:
        with safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling error of any kind: the file is refused
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise HPDError(
            f"{path} (a checkpoint of an older hpd, a pickle) holds something outside the safe allow-list "
            f"or is damaged, so it is not loaded ({reason}): resume from a checkpoint this version wrote, "
            "or start the run again in a new output_dir"
        ) from None


# --------------------------------------------------------------------------------------------
# Manifest: size and sha256 of every file, written last, checked on resume
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        os.fsync(f.fileno())  # the bytes hashed are the bytes on disk before the rename
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, step: int) -> None:
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(directory)}
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(ckpt: Path) -> str | None:
    """What is wrong with checkpoint `ckpt` (a file missing, truncated, altered, or not in its
    manifest), or None when every file matches the manifest written with it."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
        expected = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    for rel, meta in expected.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != meta["size"]:
            return f"{rel} has {size} bytes, {meta['size']} were written (truncated or altered)"
        if _sha256(p) != meta["sha256"]:
            return f"{rel} does not match its sha256 (altered)"
    extra = [str(p.relative_to(ckpt)) for p in _files(ckpt) if str(p.relative_to(ckpt)) not in expected]
    if extra:
        return f"{extra[0]} is not in its manifest (added after the checkpoint was written)"
    return None


# --------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from
# --------------------------------------------------------------------------------------------


def _discard(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves a half-deleted one under its name."""
    trash = path.parent / f".trash-{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what an interrupted write or prune left (`.tmp-step-*`, `.trash-*`, final/'s temporaries)."""
    removed = []
    for parent, pattern in ((checkpoint_root(run_dir), _LEFTOVER), (Path(run_dir), _FINAL_LEFTOVER)):
        if parent.is_dir():
            for p in sorted(parent.iterdir()):
                if pattern.match(p.name) and p.is_dir():
                    shutil.rmtree(p)
                    removed.append(str(p.relative_to(run_dir)))
    return removed


def resolve_resume(resume: str, run_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to continue from, per the `resume` setting (auto | never | a path).

    auto: the newest checkpoint that matches its manifest; a damaged newer one is reported with
    `warn` and deleted once an intact older one is found (none intact: an error, nothing deleted).
    """
    if resume == "auto":
        dirs = checkpoint_dirs(run_dir)
        damaged: list[tuple[Path, str]] = []
        for ckpt in reversed(dirs):
            problem = None if is_legacy(ckpt) else verify_checkpoint(ckpt)
            if problem is None:
                for bad, why in damaged:
                    warn(f"warning: checkpoint {bad} is damaged ({why}): deleted; resuming from {ckpt} instead")
                    _discard(bad)
                return ckpt
            damaged.append((ckpt, problem))
        if damaged:
            listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
            raise HPDError(f"no intact checkpoint in {checkpoint_root(run_dir)} ({listing}): move the run aside and "
                           "start again, or pick another output_dir")
        return None
    if resume == "never":
        if checkpoint_dirs(run_dir):
            raise HPDError(
                f"{run_dir} already holds checkpoints and resume=never: pick another output_dir, "
                "delete the old run, or set resume=auto to continue it"
            )
        return None
    path = Path(resume)
    if not ((path / MANIFEST).is_file() or (path / LEGACY_STATE_FILE).is_file()):
        raise HPDError(f"resume={resume!r}: no checkpoint there (expected {path / MANIFEST}); use auto, never or a "
                       "checkpoint dir")
    problem = None if is_legacy(path) else verify_checkpoint(path)
    if problem is not None:
        raise HPDError(f"resume={resume!r}: the checkpoint is damaged ({problem}); resume from another checkpoint "
                       "(or resume=auto, which takes the newest intact one)")
    return path


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Delete the checkpoints before `step` beyond the newest `keep_last` (`step`'s included)."""
    older = [d for d in checkpoint_dirs(run_dir) if step_of(d) < step]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        _discard(old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, *, rank: int, is_main: bool, barrier: Callable[[], None],
                    write_main: Callable[[Path], None], keep_last: int,
                    write_rank: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` atomically; every process calls this.

    write_main: called on the main process with the temporary directory to write the model, the
    trainer state and the config into. Every process writes its own RNG state, and calls
    `write_rank` when given (what it holds of its own: its shard of a sharded model, its buffer of
    reused rollouts). The manifest is written last (over every process's files: the run directory
    must be one file system for all of them), then the directory is renamed into place and older
    checkpoints are pruned.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        save_state(rng_state(), tmp, f"rng-rank{rank}")
        if write_rank is not None:
            write_rank(tmp)
        if is_main:
            write_main(tmp)
        barrier()
        if is_main:
            write_manifest(tmp, step)
            if final.exists():  # a checkpoint of this step from an earlier life of the run
                _discard(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except Exception as e:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        what = space_error(e)
        if what is None:
            raise
        last = latest_checkpoint(run_dir)
        raise HPDError(f"{what} while writing checkpoint {final.name} to {root}: the partial checkpoint was removed "
                       f"({'the last complete one is ' + str(last) if last else 'no complete checkpoint yet'}); free "
                       "space or raise the limit, then rerun with resume=auto") from None
    if is_main:
        prune(run_dir, step, keep_last)
    barrier()
    return final


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    if is_legacy(ckpt):
        return _legacy_load(ckpt / LEGACY_STATE_FILE)
    return load_state(ckpt, STATE)


def load_rng_state(ckpt: Path, rank: int) -> None:
    if is_legacy(ckpt):
        path = ckpt / f"rng-rank{rank}.pt"
        state = _legacy_load(path) if path.is_file() else None
    else:
        state = load_state(ckpt, f"rng-rank{rank}") if (ckpt / f"rng-rank{rank}.json").is_file() else None
    if state is None:
        raise HPDError(f"checkpoint {ckpt} has no RNG state for process {rank}: resume with the number of processes it was saved with")
    set_rng_state(state)


def load_student_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load the checkpoint's safetensors into `model` (same architecture), in place."""
    from safetensors.torch import load_file

    files = sorted((ckpt / "model").glob("*.safetensors"))
    if not files:
        raise HPDError(f"checkpoint {ckpt} has no model weights (model/*.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    from hpd.models.loading import is_peft_model

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
