"""What code made a run: hpd's version and a digest of its source, the git commit where hpd runs
from a checkout, and the versions of torch and transformers.

Settings and model weights are checked before a run is reused (`hpd.training.resume`, `hpd bench`'s
record), but the code is not: a bench that resumes after the code changed, or whose run processes
import a working tree that is being edited, can put runs of two versions in one table. So every
training start writes `code_record()` to the run's metrics.jsonl (a `code` record), the bench adds
it to each score it writes, and the bench's report says which code made each table's runs.

The source digest covers the package's `.py` files (paths and bytes), so it is the same on any
clone of one commit and changes with any edit, a docstring's included: equal digests mean the
same code, different ones only that something changed.

    >>> from hpd.provenance import code_record, describe_code
    >>> rec = code_record()
    >>> sorted(rec)
    ['git', 'hpd', 'python', 'source', 'torch', 'transformers']
    >>> len(rec["source"])
    16
    >>> describe_code(rec).startswith("hpd ")
    True
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def source_digest(root: Path = PACKAGE_DIR) -> str:
    """sha256 (16 hex digits) over the relative paths and bytes of every `.py` file under `root`."""
    from hpd.fingerprints import hash_files

    root = Path(root)
    return hash_files(sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts), root=root)[:16]


def git_commit(root: Path = PACKAGE_DIR) -> str | None:
    """The commit of the checkout that `root` sits at the top of, `+dirty` where its tracked files
    differ from it; None for an installed package (no `.git` beside it) or without git."""
    repo = Path(root).parent
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
                                Path(root).name], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head[:12] + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def code_record() -> dict[str, Any]:
    """This process's code (computed once: the files it imported do not change under it)."""
    import torch
    import transformers

    from hpd.version import __version__

    return {"hpd": __version__, "source": source_digest(), "git": git_commit(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def describe_code(rec: dict[str, Any]) -> str:
    """One line for a code record: `hpd 0.1.0 (source 1a2b..., git abc123), torch 2.13.0`."""
    git = f", git {rec['git']}" if rec.get("git") else ""
    return (f"hpd {rec.get('hpd', '?')} (source {rec.get('source', '?')}{git}), torch {rec.get('torch', '?')}, "
            f"transformers {rec.get('transformers', '?')}")


__all__ = ["code_record", "describe_code", "git_commit", "source_digest"]
