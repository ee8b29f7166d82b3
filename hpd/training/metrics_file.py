"""A run's metrics.jsonl: appended to, never rewritten, and read as the run stands.

One JSON object per line (`type`: info, code, train, eval, skip, resume ...; `step`). The trainer
only appends (`MetricsLog`): a resumed run first appends a `restart` marker naming the step of its
checkpoint, a run started over in a directory that already has lines (one killed before its first
checkpoint) a `restart` marker with `fresh: true`. Nothing is ever truncated, so a kill or a
file-size limit while resuming loses no line. `read_records(path)` applies the markers: the lines a
killed run wrote after the checkpoint it is resumed from (steps above it, and the evaluation at it,
which the resumed run makes again) drop out, as do all lines before a fresh start. A line cut by a
kill is skipped, and the next append starts on a line of its own.

    >>> import json, tempfile, pathlib
    >>> from hpd.training.metrics_file import MetricsLog, read_records
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> log = MetricsLog(run, enabled=True, resume_step=None)
    >>> for step in (1, 2, 3):
    ...     log.write({"type": "train", "step": step, "loss": 1.0 / step})
    >>> log = MetricsLog(run, enabled=True, resume_step=2)   # killed after step 3, resumed at step 2
    >>> log.write({"type": "train", "step": 3, "loss": 0.3})
    >>> [(r["step"], r["loss"]) for r in read_records(run / "metrics.jsonl", "train")]
    [(1, 1.0), (2, 0.5), (3, 0.3)]
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

RESTART = "restart"


def _kept(record: dict[str, Any], step: int) -> bool:
    """A record written before a resume from checkpoint `step` still describes the run."""
    at = record.get("step", 0)
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        return True
    # The resumed run evaluates again at its first step: the killed run's evaluation there goes.
    return at < step or (at == step and record.get("type") != "eval")


def read_records(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl as the run stands (restart markers applied, markers left out);
    with `kind`, only the records of that type. Unreadable lines are skipped."""
    records: list[dict[str, Any]] = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if not isinstance(rec, dict):
            continue
        if rec.get("type") == RESTART:
            records = [] if rec.get("fresh") else [r for r in records if _kept(r, rec.get("step", 0))]
            continue
        records.append(rec)
    return records if kind is None else [r for r in records if r.get("type") == kind]


def _append(path: Path, text: str) -> None:
    """Append whole lines; a last line cut by a kill is ended first, so the new ones stay readable."""
    with path.open("ab") as f:
        if f.tell() > 0:
            with path.open("rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    text = "\n" + text
        f.write(text.encode("utf-8"))


class MetricsLog:
    """metrics.jsonl of a run (appended to by the main process), each line also handed to
    `log_to(record)` (the run's experiment trackers, `hpd.training.trackers`) when given.

    resume_step: the step of the checkpoint the run resumes from, None for a run from the start."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None,
                 log_to: Callable[[dict[str, Any]], None] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_to = log_to
        self.enabled = enabled
        if enabled and self.path.exists() and self.path.stat().st_size > 0:
            marker = {"type": RESTART, "step": resume_step or 0, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if resume_step is None:
                marker["fresh"] = True  # a start over: the earlier lines describe steps trained again
            _append(self.path, json.dumps(marker) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        _append(self.path, json.dumps(clean) + "\n")
        if self.log_to is not None and "step" in record:
            self.log_to(record)


__all__ = ["MetricsLog", "RESTART", "read_records"]
