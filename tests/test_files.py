"""Atomic writes (`hpd.files`): all or nothing, and files as readable as any other the user writes."""

from __future__ import annotations

import os
import stat

import pytest

from hpd.files import atomic_write, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_a_plain_write_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        text = atomic_write_text(tmp_path / "a.txt", "hello")
        other = atomic_write(tmp_path / "b.bin", lambda p: p.write_bytes(b"\0"))
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE(text.stat().st_mode) == want and stat.S_IMODE(other.stat().st_mode) == want
    assert text.read_text() == "hello"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def boom(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
