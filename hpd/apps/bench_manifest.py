"""What a `hpd bench` output directory was made with, so that a rerun never mixes two settings.

`hpd bench` reuses what it finds under OUT: data files, finished runs and their scores. That is
what makes it resumable, and also what would make it silently wrong if a rerun changed a setting:
a data file written for `--train-per-task 4000` would be read as if it held 2000 rows, a run
trained for 240 steps would be scored as one of 500, a user's new `--train` file would be paired
with runs trained on the old one. Two checks prevent it:

- **OUT/bench.json** records the settings that shape the data files (rows per task, test and
  validation sizes, the trace writer and its temperature, the long-math steps), the content hashes
  of a user's files and the weight fingerprints of the models that make data or teach. A rerun
  whose value differs from the recorded one for any key both know is refused, with the keys
  (old -> new). New keys (a start or condition added later) are recorded, not refused.
- **Each reused run** (finished, or recorded as failed) is compared with the config the bench
  would give it now (`hpd.training.resume.config_changes`); a difference in a key that alters the run, or
  in `max_steps`, is refused with the run and the keys.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> check_manifest(out, {"data.n_eval": 500})
    >>> try:
    ...     check_manifest(out, {"data.n_eval": 100})
    ... except HPDError as e:
    ...     print(str(e).split("(")[1].split(")")[0])
    data.n_eval: 500 -> 100
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from hpd.errors import HPDError
from hpd.files import atomic_write_text

MANIFEST = "bench.json"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:24]


@contextlib.contextmanager
def exclusive(out: Path, command: str = "hpd bench") -> Iterator[None]:
    """Hold OUT for one command at a time (an OS file lock); a second one fails at once, saying so."""
    from filelock import FileLock, Timeout

    Path(out).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(out) / ".bench.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise HPDError(f"another `{command}` is running on {out}: wait for it (or stop it), or pass another --out; "
                       "`hpd bench --report` prints the tables meanwhile") from None
    try:
        yield
    finally:
        lock.release()


def check_manifest(out: Path, current: dict[str, Any], flag: str = "--out") -> None:
    """Refuse `current` if OUT/bench.json holds another value for one of its keys; else record it.
    `flag`: the option that named OUT (an archive is checked like OUT: `--archive`)."""
    path = Path(out) / MANIFEST
    saved: dict[str, Any] = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HPDError(f"{path} is not valid JSON ({e}): restore it, or use another --out") from None
    from hpd.training.resume import format_changes

    differs = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
    if differs:
        raise HPDError(f"{out} holds a bench made with other settings ({format_changes(differs)}): its data and runs "
                       f"would be mixed with this one's. Rerun with the old values to resume it, or pass another {flag} "
                       "for the new settings")
    if any(k not in saved for k in current):
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**saved, **current}, indent=2, sort_keys=True) + "\n")


def check_reused_runs(specs: Iterable[Any]) -> None:
    """Refuse a finished (or failed) run whose recorded config is not the one its spec asks for.

    specs: `hpd.apps.bench.RunSpec`s (their `run_dir` and `overrides`)."""
    from hpd.config import load_config
    from hpd.training.resume import config_changes, format_changes, run_altering, saved_config

    for sp in specs:
        run_dir = Path(sp.run_dir)
        # trained, scored (perhaps restored from an archive without its weights) or failed
        reused = any((run_dir / name).is_file() for name in ("final/config.json", "eval-test.json", "failed.json"))
        saved = saved_config(run_dir) if reused else {}
        if not saved:
            continue
        changes = config_changes(saved, load_config(None, list(sp.overrides)))
        altering = {**run_altering(changes), **{k: v for k, v in changes.items() if k == "max_steps"}}
        altering = {k: v for k, v in altering.items()
                    if not (_same_place_under_out(v, saved.get("output_dir"), run_dir) or _same_bundled_model(v))}
        if altering:
            raise HPDError(f"the finished run {run_dir} was trained with another config than this bench asks for "
                           f"({format_changes(altering)}): rerun with the settings it was made with, delete that run "
                           "directory to retrain it, or pass another --out")


def _same_place_under_out(change: tuple[Any, Any], saved_run_dir: Any, run_dir: Path) -> bool:
    """Whether a changed path is the same file of the bench's own OUT, named from another OUT (the
    run was made or restored under `--out runs/bench` and is reused under `--out /abs/elsewhere`).

    A run directory is OUT/runs/CONDITION/METHOD/SLUG, so OUT is its fourth parent on both sides;
    what the files under OUT hold is checked by OUT/bench.json, not by their path."""
    old, new = change
    if not (isinstance(old, str) and isinstance(new, str) and isinstance(saved_run_dir, str)):
        return False
    try:
        return (Path(old).relative_to(Path(saved_run_dir).parents[3])
                == Path(new).relative_to(Path(run_dir).parents[3]))
    except (ValueError, IndexError):
        return False


def _same_bundled_model(change: tuple[Any, Any]) -> bool:
    """Whether a changed path is the same bundled model (`hpd/assets/...`) of another checkout of
    the project (the run was made in /work/main and is restored in a clone elsewhere).

    Every bundled model a bench run names (teacher, long teacher, starts, trace writer) is in
    OUT/bench.json by its weights, so its content is checked there, not by its path."""
    import hpd

    old, new = change
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    assets = Path(hpd.__file__).resolve().parent / "assets"
    try:
        rest = Path(new).resolve().relative_to(assets)
    except ValueError:
        return False
    tail = ("hpd", "assets", *rest.parts)
    return Path(old).parts[-len(tail):] == tail
