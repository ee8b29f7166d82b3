"""One run per output_dir: a checked, writable run directory held under an OS file lock.

`RunDirLock(path).acquire()` checks that `path` can be a run directory (not a file, its parent
not a file, writable), creates it, and takes an exclusive `flock` on `path/.hpd.lock` (the
`filelock` library). The holder writes its pid, host and start time to `path/.hpd.lock.json`,
so a second run into the same directory fails at once with who holds it. The OS drops a flock
when its process dies, SIGKILL included, so the lock of a killed run is never stale: the next run
takes it and says whose it was. `release(cleanup=True)` also removes what `acquire` created
(for a run that stopped before writing anything).

    >>> import tempfile, pathlib
    >>> from hpd.training.run_dir import RunDirLock
    >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> lock = RunDirLock(run)
    >>> lock.acquire() is None       # no earlier holder to report
    True
    >>> RunDirLock(run).acquire()    # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    hpd.errors.HPDError: output_dir ... is in use by another hpd run (pid ...)
    >>> lock.release(cleanup=True); run.exists()
    False
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from hpd.errors import HPDError
from hpd.files import atomic_write_text, check_output

LOCK_FILE = ".hpd.lock"
HOLDER_FILE = ".hpd.lock.json"


def check_output_dir(path: Path) -> None:
    """Raise HPDError unless `path` is, or can be created as, a writable directory."""
    if path.exists() and not path.is_dir():
        raise HPDError(f"output_dir '{path}' is a file, not a directory: pick another output_dir")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor != path and not ancestor.is_dir():
        raise HPDError(f"output_dir '{path}' cannot be created: '{ancestor}' is a file, not a directory; pick another "
                       "output_dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise HPDError(f"output_dir '{path}' is not writable ('{ancestor}': permission denied or a read-only file "
                       "system): pick another output_dir or fix its permissions")


def run_inputs(cfg) -> dict[str, str | None]:
    """The paths a run reads, by config key: what its output_dir must not hold."""
    return {"student.path": cfg.student.path, "teacher.path": cfg.teacher.path, "teacher.cache": cfg.teacher.cache,
            "data.train": cfg.data.train, "data.eval": cfg.data.eval,
            # a teacher per row: each named teacher's model directory or cache (servers are no paths)
            **{f"teacher.named.{n}.{k}": v for n, t in cfg.teacher.named.items() for k, v in (t.source(),)
               if k != "server"}}


def check_run_paths(cfg) -> None:
    """The run directory of config `cfg` can be written without harm: a writable directory that is
    no filesystem root or home and holds none of the run's inputs (`hpd.files.check_output`)."""
    check_output(cfg.output_dir, run_inputs(cfg), what="output_dir")
    check_output_dir(Path(cfg.output_dir))


def describe_holder(holder: dict) -> str:
    """'pid N on HOST, started DATE' of a holder record."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


class RunDirLock:
    """An exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = None
        self._created: list[Path] = []

    @property
    def holder_file(self) -> Path:
        return self.path / HOLDER_FILE

    def _read_holder(self) -> dict | None:
        try:
            holder = json.loads(self.holder_file.read_text(encoding="utf-8"))
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> dict | None:
        """Take the lock or raise HPDError naming its holder. Returns the record of an earlier
        holder that ended without releasing it (a killed run), else None."""
        from filelock import FileLock, Timeout

        check_output_dir(self.path)
        missing = [p for p in [self.path, *self.path.parents] if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HPDError(f"output_dir '{self.path}' cannot be created ({e.strerror}): pick another output_dir") from None
        self._created = missing[::-1]  # outermost first
        lock_path = self.path / LOCK_FILE
        if not lock_path.exists():
            self._created.append(lock_path)
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self._read_holder()
            self._created = []
            raise HPDError(f"output_dir '{self.path}' is in use by another hpd run "
                           f"({describe_holder(holder) if holder else 'holder unknown'}): wait for it to end, or pick "
                           "another output_dir") from None
        except OSError as e:  # the lock file cannot be created (a full disk, a read-only mount)
            self._remove_created()
            raise HPDError(f"cannot create the lock file {lock_path} ({e.strerror}): free space or pick another "
                           "output_dir") from None
        self._lock = lock
        stale = self._read_holder()  # still there: its run ended without releasing (killed)
        if not self.holder_file.exists():
            self._created.append(self.holder_file)
        try:
            atomic_write_text(self.holder_file, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                            "started": time.time(), "argv": sys.argv}))
        except OSError as e:
            self.release(cleanup=True)
            raise HPDError(f"cannot write to output_dir '{self.path}' ({e.strerror}): free space or pick another "
                           "output_dir") from None
        return stale

    def release(self, cleanup: bool = False) -> None:
        """Drop the lock. cleanup: also remove the files and directories `acquire` created."""
        if self._lock is None:
            return
        try:
            self.holder_file.unlink(missing_ok=True)  # a holder file left behind means a killed run
            if cleanup:
                self._remove_created()
        finally:
            self._lock.release()
            self._lock = None

    def _remove_created(self) -> None:
        for p in reversed(self._created):
            try:
                if p.is_dir():
                    p.rmdir()  # only if empty: never anything else the run wrote
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
        self._created = []
