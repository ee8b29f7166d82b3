"""The distribution: `pip install .` from a clone installs this project as `hpd-distill`.

The registry's `hpd` is an unrelated project, so the distribution has a name of its own; a clean
virtual environment gets this source (not a registry download: the install runs with --no-index),
its version, its `hpd` command and its extras.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

import hpd

ROOT = Path(__file__).resolve().parents[1]
NAME = "hpd-distill"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_distribution_name_is_ours_everywhere_a_user_reads_it():
    meta = _pyproject()["project"]
    assert meta["name"] == NAME and meta["version"] == hpd.__version__
    # Every install hint names the distribution, never the registry's unrelated `hpd`.
    files = [ROOT / "README.md", *(ROOT / "hpd").rglob("*.py"), *(ROOT / "docs").rglob("*.md")]
    wrong = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files
             for m in re.finditer(r"pip install ['\"]?hpd(\[[^\]]*\])?(?![-\w])", f.read_text(errors="replace"))]
    assert not wrong, wrong


def test_pip_install_from_a_clone_resolves_to_this_project(tmp_path):
    if shutil.which("pip", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("no pip beside this interpreter")
    src = tmp_path / "src"  # what a clone holds that the build reads (the test leaves the checkout alone)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hpd", src / "hpd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True)  # noqa: E731
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"), str(src))
    wheel = next((tmp_path / "wheels").glob("*.whl"))
    assert wheel.name == f"hpd_distill-{hpd.__version__}-py3-none-any.whl"
    env = tmp_path / "env"  # a plain venv: no site packages of this one, no pip of its own
    run(sys.executable, "-m", "venv", "--without-pip", str(env))
    python = env / "bin" / "python"
    run(*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    probe = (
        "import importlib.metadata as m, json\n"
        f"d = m.distribution({NAME!r})\n"
        "try:\n    m.distribution('hpd'); other = True\nexcept m.PackageNotFoundError:\n    other = False\n"
        "print(json.dumps({'version': d.version, 'init': str(d.locate_file('hpd/__init__.py')), 'other': other,\n"
        "                  'extras': d.metadata.get_all('Provides-Extra'), 'requires': d.requires,\n"
        "                  'scripts': [e.value for e in d.entry_points if e.name == 'hpd']}))\n"
    )
    # run from an empty folder: `-c` puts the working directory first on sys.path, and a checkout's
    # *.egg-info there (an older editable install) would be found as an installed distribution
    got = json.loads(subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True,
                                    cwd=env).stdout)
    assert got["version"] == hpd.__version__ and not got["other"]
    installed = Path(got["init"])
    assert installed.is_relative_to(env) and installed.read_bytes() == (ROOT / "hpd" / "__init__.py").read_bytes()
    assert got["scripts"] == ["hpd.apps.cli:main"] and (env / "bin" / "hpd").is_file()
    # `pip install '.[trl]'` etc.: every extra of pyproject.toml, with its requirements.
    extras = _pyproject()["project"]["optional-dependencies"]
    assert sorted(got["extras"]) == sorted(extras)
    assert any(r.startswith("trl") and 'extra == "trl"' in r for r in got["requires"])
    # The shipped models and data travel in the wheel (hpd.apps.demo's teacher, examples).
    assert list((env / "lib").glob("python*/site-packages/hpd/assets/teacher/config.json"))
