"""What a resumed run may change: the config of a run is compared with its checkpoint's.

A checkpoint holds the resolved config it was written with (`config.yaml`). Resuming with a config
that differs in a key that alters the run (objective, learning rate, schedule, data, models,
seed, batch, ...) is refused with the differing keys (old -> new), unless the run sets
`resume_allow_changes=true`; the trainer then applies the new values (the optimizer's lr, weight
decay and betas included, never silently the checkpoint's) and records the change in
metrics.jsonl and RUN_DIR/config_history.jsonl. Keys in `RUN_NEUTRAL_KEYS` change where or how
often things are logged or saved, not the trajectory, and may always change. `max_steps` may
change without the flag: the learning-rate schedule is then recomputed over the new
`max_steps` (a stretched or shrunk schedule), which `schedule_note` states with the lr before and
after at the resume step.

    >>> from hpd.config import Config, config_to_dict
    >>> from hpd.training.resume import config_changes
    >>> old, new = config_to_dict(Config()), Config()
    >>> new.optim.lr, new.log.progress = 0.01, False
    >>> config_changes(old, new)
    {'optim.lr': (0.001, 0.01), 'log.progress': (True, False)}
    >>> run_altering(config_changes(old, new))
    {'optim.lr': (0.001, 0.01)}
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml

from hpd.config import Config, config_to_dict, mapping_fields
from hpd.errors import HPDError
from hpd.training.schedule import lr_lambda

# Keys that never alter the weights a run ends with: where the run lives, what is logged and how
# often, how often and how many checkpoints are kept, when a diverging run gives up, and where
# cached teacher generations are stored (they are keyed by a hash of teacher and data, so another
# directory holds the same generations). Evaluation settings are here too: evaluation reads no
# training randomness (its draws have their own seeds), so it does not move the trajectory.
RUN_NEUTRAL_KEYS = frozenset({
    "resume_allow_changes", "max_steps",
    "log.every", "log.eval_every", "log.eval_batches", "log.tensorboard", "log.report_to", "log.progress", "log.diagnostics_every",
    "save.every", "save.keep_last", "save.dtype",  # save.dtype: only final/'s copy on disk
    "optim.max_bad_steps",
    "regime.teacher_cache", "regime.vllm_gpu_memory", "regime.allow_biased_rollouts",
    # where and how rollouts are served: the same weights sample the same distribution
    "regime.vllm_url", "regime.vllm_python", "regime.vllm_args",
    # Where the teacher is served and how patiently it is asked: a run resumes against servers that
    # came back elsewhere (the served model is checked against the student at every start).
    "teacher.server", "teacher.server_timeout", "teacher.server_retries",
})


# Where the run lives and how it was pointed at its checkpoint: never compared (a run directory
# may be moved or copied, and resume=auto / resume=PATH name the same continuation).
NOT_COMPARED = frozenset({"output_dir", "resume"})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in mapping_fields():  # teacher.named is one value
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (checkpoint's value, this run's value) for every key both know that differs.

    A key one side lacks (a config of another hpd version) is not compared, nor NOT_COMPARED."""
    old, new = _flat(saved), _flat(config_to_dict(cfg))
    return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v and k not in NOT_COMPARED}


def run_altering(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    return {k: v for k, v in changes.items() if k not in RUN_NEUTRAL_KEYS}


def saved_config(ckpt: Path) -> dict[str, Any]:
    """The config a checkpoint was written with, as a nested dict ({} when it holds none)."""
    path = Path(ckpt) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise HPDError(f"{path} is not valid YAML ({e}); resume from another checkpoint") from None
    return data if isinstance(data, dict) else {}


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """`key: old -> new, ...`: how every refusal of a changed setting names what changed."""
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def check_changes(changes: dict[str, tuple[Any, Any]], cfg: Config, ckpt: Path, step: int) -> None:
    """Raise HPDError when the resume would change the run and the config does not allow it."""
    if cfg.max_steps < step:
        raise HPDError(f"max_steps={cfg.max_steps} is below the step of the checkpoint to resume from ({ckpt}, step "
                       f"{step}): set max_steps >= {step}, or resume from an earlier checkpoint")
    altering = run_altering(changes)
    if altering and not cfg.resume_allow_changes:
        raise HPDError(
            f"the config differs from the one of checkpoint {ckpt} in keys that change the run ({format_changes(altering)}): "
            "to continue the run as it was, drop these changes; for a new run, pick another output_dir; to continue "
            "this run with the changes anyway, add resume_allow_changes=true (recorded in metrics.jsonl and "
            "config_history.jsonl)")


def schedule_note(saved: dict[str, Any], cfg: Config, step: int) -> str | None:
    """What happens to the learning rate at `step` when max_steps or the schedule changed, else None."""
    old_cfg = copy.deepcopy(cfg)
    flat = _flat(saved)
    keys = ("max_steps", "optim.lr", "optim.schedule", "optim.warmup_ratio", "optim.min_lr_ratio")
    if all(flat.get(k, v) == v for k, v in zip(keys, (cfg.max_steps, cfg.optim.lr, cfg.optim.schedule,
                                                          cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio))):
        return None
    old_cfg.max_steps = flat.get("max_steps", cfg.max_steps)
    o = old_cfg.optim
    o.lr, o.schedule = flat.get("optim.lr", o.lr), flat.get("optim.schedule", o.schedule)
    o.warmup_ratio, o.min_lr_ratio = flat.get("optim.warmup_ratio", o.warmup_ratio), flat.get("optim.min_lr_ratio", o.min_lr_ratio)
    before = o.lr * lr_lambda(old_cfg)(step)
    after = cfg.optim.lr * lr_lambda(cfg)(step)
    return (f"the learning-rate schedule ({cfg.optim.schedule}, warmup_ratio {cfg.optim.warmup_ratio}, peak lr "
            f"{cfg.optim.lr:g}) is recomputed over max_steps={cfg.max_steps} (was {old_cfg.max_steps}) as if the run "
            f"had been planned so from the start: at step {step} the lr goes from {before:.6g} (the checkpoint's "
            f"schedule) to {after:.6g}")


def record_history(run_dir: Path, ckpt: Path, step: int, changes: dict[str, tuple[Any, Any]], note: str | None) -> dict:
    """Append the change to RUN_DIR/config_history.jsonl; returns the record (also for metrics.jsonl)."""
    record = {"type": "resume", "step": step, "checkpoint": str(ckpt),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "changes": {k: [a, b] for k, (a, b) in changes.items()}}
    if note:
        record["schedule"] = note
    with open(Path(run_dir) / "config_history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return record


__all__ = ["RUN_NEUTRAL_KEYS", "check_changes", "config_changes", "record_history", "run_altering", "saved_config",
           "schedule_note"]
