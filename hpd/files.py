"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of one.

`atomic_write_text(path, text)` and `atomic_write(path, write)` (for writers that take a path,
e.g. matplotlib's `savefig`) write to a temporary name in the target's directory and rename it
over the target; `replace_dir(tmp, out)` puts a finished directory in place of another one.

A cached output is written with its record: `write_keyed(path, text, key)` writes `path` and
then `path.key` (the key it was made under, its size and sha256), and `keyed_problem(path, key)`
says why `path` cannot be reused (missing, another key, altered or cut since), or None. Leftovers
of a killed writer (`.NAME.XXXXXXXX.tmp`) go with `clean_temporaries(path)`, and
`check_output(out, inputs)` refuses an output that would overwrite what a command reads (or a
filesystem root or the home directory as a directory to write into).

    >>> import tempfile, pathlib
    >>> from hpd.files import atomic_write_text
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write_text(p, "hello").read_text()
    'hello'
    >>> _ = write_keyed(p, "data", "k1")
    >>> keyed_problem(p, "k1") is None, keyed_problem(p, "k2")
    (True, 'it was made with other inputs or settings')
    >>> _ = p.write_text("dat")
    >>> keyed_problem(p, "k1")
    'it was changed or cut after it was written (3 bytes, 4 recorded)'
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Mapping

from hpd.errors import HPDError


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


def temp_dir_for(out: str | os.PathLike, token: str | None = None) -> Path:
    """Where a directory meant for `out` is built before `replace_dir` puts it in place: `.OUT.tmp-TOKEN` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.tmp-{token or uuid.uuid4().hex[:8]}"


def recover_replaced_dir(out: str | os.PathLike) -> list[str]:
    """Undo what a killed `temp_dir_for` + `replace_dir` left beside `out`; call it holding the lock
    on `out`'s writers. Half-built `.OUT.tmp-*` directories go; an old `out` set aside
    (`.OUT.old-*`) is put back when `out` is missing (the kill fell between the two renames), else
    deleted. Returns what it did, one line each."""
    out = Path(out)
    done = []
    if not out.parent.is_dir():
        return done
    pattern = re.compile(r"\." + re.escape(out.name) + r"\.(tmp|old)-[0-9a-f]{8}")
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir():
            continue
        if m.group(1) == "old" and not out.exists():
            os.replace(p, out)
            done.append(f"put back {out} (set aside by a replacement that was interrupted)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by an interrupted write)")
    return done


def clean_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `atomic_write` left next to `path` (and its `.key` record) when a
    kill stopped it; call it while holding the lock on `path`'s writers. Returns what went."""
    path = Path(path)
    pattern = re.compile(r"\." + re.escape(path.name) + r"(\.key|\.partial)?\.[A-Za-z0-9_]{8}\.tmp")
    gone = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


# --------------------------------------------------------------------------------------------
# Outputs written with their record: the key they were made under and a checksum of their bytes
# --------------------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def key_record_path(path: str | os.PathLike) -> Path:
    """Where `write_keyed` keeps the record of `path`: `path.key`."""
    path = Path(path)
    return path.with_name(path.name + ".key")


def write_keyed(path: str | os.PathLike, text: str, key: str) -> Path:
    """Write `text` to `path` atomically, then its record `path.key` (key, size, sha256).

    The old record goes first, so a kill between the two renames leaves an output without a
    record (not reused) rather than a new output under an old record."""
    path = Path(path)
    record = key_record_path(path)
    record.unlink(missing_ok=True)
    atomic_write_text(path, text)
    atomic_write_text(record, json.dumps({"key": key, "size": path.stat().st_size, "sha256": _digest(path)}) + "\n")
    return path


def keyed_problem(path: str | os.PathLike, key: str) -> str | None:
    """None when `path` was written by `write_keyed` under `key` and is unchanged; else why not."""
    path = Path(path)
    if not path.is_file():
        return "it does not exist"
    try:
        record = json.loads(key_record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "it has no readable record of how it was made"
    if not isinstance(record, dict) or record.get("key") != key:
        return "it was made with other inputs or settings"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"it was changed or cut after it was written ({size} bytes, {record.get('size')} recorded)"
    if _digest(path) != record.get("sha256"):
        return "it was changed after it was written (its sha256 differs from the recorded one)"
    return None


# --------------------------------------------------------------------------------------------
# Errors of a full disk; outputs that would overwrite inputs
# --------------------------------------------------------------------------------------------

_SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large for the file-size limit",
                 errno.EDQUOT: "disk quota exceeded"}
_SPACE_TEXTS = {"No space left": "no space left on device", "File too large": "file too large for the file-size limit",
                "os error 28": "no space left on device", "os error 27": "file too large for the file-size limit",
                "Disk quota": "disk quota exceeded"}


def space_error(e: BaseException) -> str | None:
    """'no space left on device' (or the file-size limit, a quota) when `e` is that, else None.

    safetensors writes from Rust, so its error is a message, not an OSError with an errno."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _SPACE_ERRNOS:
            return _SPACE_ERRNOS[seen.errno]
        text = str(seen)
        for pattern, what in _SPACE_TEXTS.items():
            if pattern in text:
                return what
        seen = seen.__cause__ or seen.__context__
    return None


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def check_output(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None] = {}, *,
                 what: str = "output_dir", directory: bool = True) -> None:
    """Raise HPDError when writing `out` could destroy what the command reads, before anything is written.

    inputs: name (as the user wrote it, e.g. 'student.path') -> path; names that are no path on
    disk ('tiny', a Hub id, None) are skipped. directory=True: `out` is a directory the command
    writes into (or replaces): refused when it is a filesystem root or the home directory, or when
    it is or holds an input. directory=False: `out` is a file, refused when it is an input or lies
    inside an input directory (a model's). Symlinks are followed on both sides."""
    target = _real(out)
    if directory:
        if target == Path(target.anchor):
            raise HPDError(f"{what} '{out}' is a filesystem root: pick a directory of its own (e.g. runs/NAME)")
        try:
            home = _real(Path.home())
        except (KeyError, RuntimeError):
            home = None
        if home is not None and target == home:
            raise HPDError(f"{what} '{out}' is the home directory: pick a directory of its own (e.g. ~/runs/NAME)")
    for name, value in inputs.items():
        if value is None or not str(value).strip() or not os.path.exists(os.path.expanduser(os.fspath(value))):
            continue
        source = _real(value)
        if directory and (source == target or target in source.parents):
            raise HPDError(f"{what} '{out}' holds the input {name} '{value}': the run would overwrite it; pick "
                           f"another {what}, or move the input out of it first")
        if not directory and (source == target or source in target.parents):
            inside = "is" if source == target else "is inside"
            raise HPDError(f"{what} '{out}' {inside} the input {name} '{value}': writing it would destroy the input; "
                           f"pick another {what}")


__all__ = ["atomic_write", "atomic_write_text", "check_output", "clean_temporaries", "key_record_path",
           "keyed_problem", "recover_replaced_dir", "replace_dir", "space_error", "temp_dir_for", "write_keyed"]
