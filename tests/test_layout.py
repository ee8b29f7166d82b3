"""The library never imports the applications (`hpd.apps`): checked on the import graph at run
time and on every import statement in the source, including the lazy ones inside functions."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import hpd

ROOT = Path(__file__).resolve().parents[1]
APPS = ("hpd.apps", "hpd.cli", "hpd.plots", "hpd.evaluate", "hpd.verifiers", "hpd.experiments", "hpd.tasks",
        "hpd.bench", "hpd.bench_report", "hpd.demo")
# The old-path shims of the moved modules (`hpd._moved`) are allowed to import the apps.
NOT_LIBRARY = {"hpd._moved", *APPS}


def library_modules() -> list[str]:
    names = ["hpd"] + [m.name for m in pkgutil.walk_packages(hpd.__path__, "hpd.")]
    return sorted(n for n in names if not any(n == a or n.startswith(a + ".") for a in NOT_LIBRARY))


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_is_what_we_think():
    modules = library_modules()
    for core in ("hpd.trainer", "hpd.config", "hpd.objectives.surrogate", "hpd.teachers", "hpd.regimes"):
        assert core in modules
    assert not any(m.startswith("hpd.apps") for m in modules)


def test_no_library_source_imports_an_app():
    offenders = {}
    for module in library_modules():
        rel = ROOT.joinpath(*module.split("."))
        path = rel.with_suffix(".py") if rel.with_suffix(".py").exists() else rel / "__init__.py"
        bad = sorted(n for n in _imported_names(path) if any(n == a or n.startswith(a + ".") for a in APPS))
        if bad:
            offenders[module] = bad
    assert offenders == {}


def test_importing_the_library_loads_no_app():
    # A fresh interpreter imports every library module in turn and reports the first one after
    # which an app module is loaded (an import hidden behind a plugin or a re-export included).
    code = (
        "import importlib, json, sys\n"
        f"for name in {library_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "    apps = sorted(m for m in sys.modules if m.startswith('hpd.apps') or m in %r)\n"
        "    if apps:\n"
        "        print(json.dumps([name, apps])); break\n"
        "else:\n"
        "    print(json.dumps(None))\n"
    ) % (APPS,)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is None


def test_old_paths_of_the_moved_apps_are_the_new_modules(tmp_path):
    # One release of grace: `hpd.tasks`, `hpd.evaluate`, ... are the moved modules themselves, so
    # a monkeypatch through the old path reaches the code, and a pickle naming it loads.
    import importlib
    import pickle

    for old in ("cli", "plots", "evaluate", "verifiers", "experiments", "tasks", "tasks.code", "tasks.sandbox"):
        assert importlib.import_module(f"hpd.{old}") is importlib.import_module(f"hpd.apps.{old}"), old
    from hpd.apps.tasks import get_task

    task = get_task("capitals")
    # protocol 2 names the class as text (GLOBAL "module name"), with no length to keep in step
    blob = pickle.dumps(task, protocol=2).replace(b"hpd.apps.tasks.capitals", b"hpd.tasks.capitals")
    assert b"hpd.tasks.capitals" in blob and b"hpd.apps" not in blob
    code = f"import pickle, sys; t = pickle.loads({blob!r}); print(type(t).__module__, t.name)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["hpd.apps.tasks.capitals", "capitals"]
