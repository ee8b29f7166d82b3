"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of one.

`atomic_write_text(path, text)` and `atomic_write(path, write)` (for writers that take a path,
e.g. matplotlib's `savefig`) write to a temporary name in the target's directory and rename it
over the target; `replace_dir(tmp, out)` puts a finished directory in place of another one.

    >>> import tempfile, pathlib
    >>> from hpd.files import atomic_write_text
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write_text(p, "hello").read_text()
    'hello'
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary path next to `path`, then rename it to `path`.

    The parent directory is created; the temporary file is removed if `write` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); the result gets the mode a plain open() would
        # give it, so a model or run directory is as readable as any other file the user writes.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """This process's umask, read without changing it where the OS says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Put the finished directory `tmp` at `out`, replacing what is there.

    `os.replace` cannot overwrite a non-empty directory: the old one is moved aside first and
    deleted only once the new one is in place (put back if the move fails).
    """
    tmp, out = Path(tmp), Path(out)
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["atomic_write", "atomic_write_text", "replace_dir"]
