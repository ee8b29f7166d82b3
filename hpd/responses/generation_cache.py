"""Generated completions kept on disk under a key, reused while the key holds and the bytes match.

One cache for both users of generations made ahead of training: the teacher regime (the teacher's
completion of every training prompt, `hpd.responses.regimes.TeacherGenerations`) and `hpd generate` (a JSONL
of completions for any prompts file). The key names what made the output (the model, the prompts,
the sampling settings). The output is written with its record `OUT.key` (the key, the output's size
and sha256: `hpd.files.write_keyed`), so an output cut, edited or replaced by another run is not
reused, whatever its key file says. A generation made batch by batch keeps each finished batch as
one line of `OUT.partial` (first line: the key), so an interrupted one resumes; batches are found
by their index, so a repeated or cut line neither duplicates nor drops rows. Writers hold
`.OUT.lock` (an OS lock, the `filelock` library as for run directories): a second writer of the same
OUT waits or is refused, and the holder removes what a killed writer left.

    >>> import tempfile, pathlib
    >>> from hpd.responses.generation_cache import GenerationCache
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "gen.jsonl"
    >>> cache = GenerationCache(out, "k1")
    >>> cache.fresh()
    False
    >>> with cache.writing():
    ...     _ = cache.store('{"completion": "4"}\\n')
    >>> cache.fresh(), GenerationCache(out, "k2").fresh()
    (True, False)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from hpd.errors import HPDError
from hpd.files import atomic_write_text, clean_temporaries, key_record_path, keyed_problem, write_keyed


class GenerationCache:
    """The output file `path` of a generation keyed by `key` (its record: `path.key`)."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self.key_file = key_record_path(self.path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.lock_file = self.path.with_name(f".{self.path.name}.lock")

    def problem(self) -> str | None:
        """None when the output exists, was made with this key and is unchanged; else why it is not reusable."""
        return keyed_problem(self.path, self.key)

    def fresh(self) -> bool:
        """The output exists, was made with this key, and its bytes are the ones written."""
        return self.problem() is None

    def read_text(self) -> str:
        """The output, checked against its record (HPDError if it changed since `fresh`)."""
        problem = self.problem()
        if problem is not None:
            raise HPDError(f"cached generations '{self.path}' cannot be used: {problem}; delete it to generate again")
        return self.path.read_text(encoding="utf-8")

    @contextlib.contextmanager
    def writing(self, wait: bool = False) -> Iterator[None]:
        """Hold the lock on this output's writers (wait=False: refuse at once if another holds it);
        the leftovers of a killed writer (temporary files) are removed once it is held."""
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_file), timeout=-1 if wait else 0)
        try:
            lock.acquire()
        except Timeout:
            raise HPDError(f"'{self.path}' is being written by another hpd process (it holds {self.lock_file}): "
                           "wait for it to end, or pick another output") from None
        try:
            clean_temporaries(self.path)
            yield
        finally:
            lock.release()

    def partial_batches(self) -> dict[int, list[dict[str, Any]]]:
        """batch index -> rows, of the batches finished by an interrupted generation with the same key.

        A stale file (another key) goes; unreadable lines (cut by a kill) are dropped and the file
        rewritten without them, so later batches append after whole lines."""
        if not self.partial.is_file():
            return {}
        lines = self.partial.read_text(encoding="utf-8", errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("key") != self.key:
            self.partial.unlink()
            return {}
        batches: dict[int, list[dict[str, Any]]] = {}
        damaged = False
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                batches[int(rec["batch"])] = [dict(r) for r in rec["rows"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                damaged = True  # a line cut by the interruption: that batch is generated again
        if damaged or not self.partial.read_bytes().endswith(b"\n"):
            atomic_write_text(self.partial, "".join(
                json.dumps(r, ensure_ascii=False) + "\n"
                for r in [{"key": self.key}, *({"batch": i, "rows": rows} for i, rows in sorted(batches.items()))]))
        return batches

    def append_batch(self, index: int, rows: list[dict[str, Any]]) -> None:
        """Record finished batch `index`, so that an interrupted generation resumes after it."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"batch": index, "rows": rows}, ensure_ascii=False) + "\n"
        with self.partial.open("a", encoding="utf-8") as fh:
            if fh.tell() == 0:
                line = json.dumps({"key": self.key}) + "\n" + line
            fh.write(line)  # one write: a kill cuts at most this line
            fh.flush()
            os.fsync(fh.fileno())

    def store(self, text: str) -> Path:
        """Write the output with its record (`hpd.files.write_keyed`); the partial rows are no longer needed."""
        write_keyed(self.path, text, self.key)
        self.partial.unlink(missing_ok=True)
        return self.path


__all__ = ["GenerationCache"]
