"""The documentation site builds without a warning and its Python examples run.

`mkdocs build --strict` fails on a broken link, a missing page or an API docstring mkdocstrings
cannot render; the reference pages are generated from the code at build time, so a build is also
a check that they can be. Every ```python block of docs/*.md runs, in order per page, in one
namespace per page, from the repository root (a block after `<!-- no-run -->` is shown only).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- no-run -->\s*)?```python\n(.*?)```", re.S)


def test_the_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is missing: `pip install -e '.[test]'` (or '.[docs]') installs it"
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "hpd train" in cli and "hpd generate" in cli


def _pages_with_examples() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())


@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: str(p.relative_to(DOCS)))
def test_the_python_examples_of_a_page_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for skip, code in BLOCK.findall(page.read_text()):
        if not skip:
            exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - our own docs
