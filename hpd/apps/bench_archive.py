"""Keep a bench's results where they outlive its output directory: `hpd bench --archive DIR`.

A bench takes hours; its output directory holds model weights and checkpoints (hundreds of MB)
and is rarely kept: a fresh cloud or CI machine starts without it. `--archive DIR` copies the small
files of every finished run (its resolved `config.yaml`, `metrics.jsonl`, the `eval-*.json` scores
and answers, `failed.json`; never weights), gzip-compressed with fixed headers so that the same
run always gives the same bytes, to `DIR/<condition>/<method>/<rate>-s<seed>/`. A directory
inside a git repository is the intended place: commit it as runs finish.

The archive also keeps the small records of OUT's data that the tables print (the traces'
share wrong, `data/traces/stats.json`), so that `--report` on a fresh OUT needs no generation.

The archive records the settings that shaped its runs' data (`DIR/bench.json`, as OUT does:
`hpd.apps.bench_manifest.check_manifest`), so a bench with other settings is refused it. A bench
started with the same `--archive` on a machine that lacks a finished run restores those files into
OUT first, so the run counts as done (its config is checked against the bench's like
any reused run: `hpd.apps.bench_manifest.check_reused_runs`) and the tables include it. Only
finished runs are archived or restored; a run in progress resumes from its checkpoint in OUT, or
starts again.

    >>> import tempfile, pathlib
    >>> out, keep = (pathlib.Path(tempfile.mkdtemp()) for _ in range(2))
    >>> run = out / "runs" / "c" / "hpd" / "lr1e-3-s0"; run.mkdir(parents=True)
    >>> _ = (run / "eval-test.json").write_text('{"accuracy": 0.5}')
    >>> archive_run(run, out, keep)
    ['eval-test.json']
    >>> import shutil; shutil.rmtree(out / "runs")
    >>> restore_run(run, out, keep)
    ['eval-test.json']
    >>> (run / "eval-test.json").read_text()
    '{"accuracy": 0.5}'
"""

from __future__ import annotations

import gzip
from pathlib import Path

from hpd.files import atomic_write

# The files of a run that the tables are made from; weights and checkpoints are never kept.
KEPT = ("config.yaml", "metrics.jsonl", "failed.json", "eval-*.json")
# A run is finished (and so worth keeping) once it holds one of these.
FINISHED = ("eval-test.json", "failed.json")


def _kept_files(run_dir: Path) -> list[Path]:
    return sorted({p for pattern in KEPT for p in Path(run_dir).glob(pattern) if p.is_file()})


def _place(run_dir: Path, out: Path, archive: Path) -> Path:
    return Path(archive) / Path(run_dir).relative_to(Path(out) / "runs")


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def archive_run(run_dir: Path, out: Path, archive: Path) -> list[str]:
    """Copy a finished run's kept files into the archive; the names of the files written (new or
    changed). A run without a score or a failure record is not finished: nothing is written."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).is_file() for name in FINISHED):
        return []
    dest = _place(run_dir, out, archive)
    written = []
    for src in _kept_files(run_dir):
        # mtime=0 and no file name in the header: the same content always gives the same bytes,
        # so re-archiving an unchanged run changes nothing in git.
        data = gzip.compress(src.read_bytes(), compresslevel=9, mtime=0)
        target = dest / (src.name + ".gz")
        if target.is_file() and target.read_bytes() == data:
            continue
        _write_bytes(target, data)
        written.append(src.name)
    return written


def restore_run(run_dir: Path, out: Path, archive: Path) -> list[str]:
    """Write the archived files of a finished run into `run_dir`; the names of the files written.

    Only into a run directory that holds none of the kept files: a run started in OUT (finished or
    not) is OUT's own and is never mixed with the archive's record of another attempt; once it
    finishes, `archive_run` records it in place of the old one. Nothing is written for a run the
    archive does not hold as finished."""
    run_dir = Path(run_dir)
    src = _place(run_dir, out, archive)
    if not any((src / (name + ".gz")).is_file() for name in FINISHED) or _kept_files(run_dir):
        return []
    written = []
    for gz in sorted(src.glob("*.gz")):
        _write_bytes(run_dir / gz.name[: -len(".gz")], gzip.decompress(gz.read_bytes()))
        written.append(gz.name[: -len(".gz")])
    return written


def archive_data_file(path: Path, out: Path, archive: Path) -> bool:
    """Keep a small file of OUT's data (`OUT/data/...`) at the same place under the archive; whether
    anything was written (an unchanged file is not written again)."""
    dest = Path(archive) / Path(path).relative_to(Path(out))
    data = Path(path).read_bytes()
    if dest.is_file() and dest.read_bytes() == data:
        return False
    _write_bytes(dest, data)
    return True


def archived_data_file(path: Path, out: Path, archive: Path) -> Path | None:
    """The archive's copy of a file of OUT's data, if it holds one."""
    kept = Path(archive) / Path(path).relative_to(Path(out))
    return kept if kept.is_file() else None
