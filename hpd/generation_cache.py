"""Generated completions kept on disk under a key, reused while the key holds.

One cache for both users of generations made ahead of training: the teacher regime (the teacher's
completion of every training prompt, `hpd.regimes.TeacherGenerations`) and `hpd generate` (a JSONL
of completions for any prompts file). The key names what made the output (the model, the prompts,
the sampling settings); the output is written atomically, and a generation made batch by batch
keeps its finished batches in `OUT.partial` (first line: the key), so an interrupted one resumes.

    >>> import tempfile, pathlib
    >>> from hpd.generation_cache import GenerationCache
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "gen.jsonl"
    >>> cache = GenerationCache(out, "k1")
    >>> cache.fresh()
    False
    >>> _ = cache.store('{"completion": "4"}\\n')
    >>> cache.fresh(), GenerationCache(out, "k2").fresh()
    (True, False)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpd.files import atomic_write_text


class GenerationCache:
    """The output file `path` of a generation keyed by `key`.

    sidecar: the key is kept in `path.key` (True), or it is part of `path`'s own name and no
    sidecar is written (False: the file is fresh whenever it exists).
    """

    def __init__(self, path: str | Path, key: str, *, sidecar: bool = True):
        self.path, self.key, self.sidecar = Path(path), key, sidecar
        self.key_file = self.path.with_name(self.path.name + ".key")
        self.partial = self.path.with_name(self.path.name + ".partial")

    def fresh(self) -> bool:
        """The output exists and was made with this key."""
        if not self.path.is_file():
            return False
        return not self.sidecar or (self.key_file.is_file() and self.key_file.read_text().strip() == self.key)

    def read_text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def partial_rows(self) -> list[dict[str, Any]]:
        """Rows finished by an interrupted generation with the same key (else none; a stale file goes)."""
        if not self.partial.is_file():
            return []
        lines = self.partial.read_text(encoding="utf-8").splitlines()
        rows: list[dict[str, Any]] = []
        try:
            if not lines or json.loads(lines[0]).get("key") != self.key:
                self.partial.unlink()
                return []
            for line in lines[1:]:
                rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by the interruption: keep the rows before it
        return rows

    def append_partial(self, rows: list[dict[str, Any]]) -> None:
        """Record finished rows, so that an interrupted generation resumes after them."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with self.partial.open("a", encoding="utf-8") as fh:
            if fh.tell() == 0:
                fh.write(json.dumps({"key": self.key}) + "\n")
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def store(self, text: str) -> Path:
        """Write the output (atomically) and its key; the partial rows are no longer needed."""
        atomic_write_text(self.path, text)
        if self.sidecar:
            atomic_write_text(self.key_file, self.key + "\n")
        self.partial.unlink(missing_ok=True)
        return self.path


__all__ = ["GenerationCache"]
