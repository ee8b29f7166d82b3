"""The library never imports the applications (`hpd.apps`): checked on the import graph at run
time and on every import statement in the source, including the lazy ones inside functions. No
module imports itself back through others (no import cycle), and the old paths of the moved
applications are gone. The folders show the flow of a step (`hpd.teachers`, `hpd.responses`,
`hpd.data`, `hpd.models`, `hpd.training`, `hpd.objectives`): the top level holds only what every
layer shares, a subpackage's `__init__` re-exports nothing (no shims), and no module grows past
600 lines without its docstring saying why."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import hpd

ROOT = Path(__file__).resolve().parents[1]
APPS = ("hpd.apps",)
NOT_LIBRARY = set(APPS)
# The applications' old top-level paths (before they moved to `hpd.apps`): removed, nothing released used them.
OLD_PATHS = ("cli", "plots", "evaluate", "verifiers", "experiments", "tasks", "bench", "bench_report", "demo")


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
    for core in ("hpd.training.trainer", "hpd.config", "hpd.objectives.surrogate", "hpd.teachers.sources", "hpd.responses.regimes"):
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


def test_old_paths_of_the_moved_apps_are_gone():
    # Looked up in this checkout's package folder only (an editable install elsewhere may still have them).
    top = {m.name for m in pkgutil.iter_modules(hpd.__path__)}
    apps = {m.name for m in pkgutil.iter_modules([str(Path(hpd.__path__[0]) / "apps")])}
    assert sorted(top & set(OLD_PATHS)) == [], "old paths exist again: the modules are under hpd.apps"
    assert set(OLD_PATHS) <= apps and "_moved" not in top


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """hpd's modules -> the hpd modules each imports: every import statement that runs, at module
    level or inside a function, absolute or relative (`from hpd import x` counts as `hpd` and
    `hpd.x`); those under `if TYPE_CHECKING:` are left out (they never run)."""
    paths = {}
    for path in (root / "hpd").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # `if TYPE_CHECKING:` imports never run (names for annotations only): not edges.
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {t for t in map(module_of, (t for t in targets if t == "hpd" or t.startswith("hpd."))) if t and t != module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_the_import_graph_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "hpd" / "sub").mkdir(parents=True)
    (tmp_path / "hpd" / "__init__.py").write_text("")
    (tmp_path / "hpd" / "a.py").write_text("def f():\n    from hpd.sub import b\n")
    (tmp_path / "hpd" / "sub" / "__init__.py").write_text("")
    (tmp_path / "hpd" / "sub" / "b.py").write_text("from ..a import f\nimport os\n")
    (tmp_path / "hpd" / "c.py").write_text("import hpd.a\nif TYPE_CHECKING:\n    import hpd.sub.b\n")
    graph = import_graph(tmp_path)
    assert graph["hpd.a"] == {"hpd.sub", "hpd.sub.b"} and graph["hpd.sub.b"] == {"hpd.a"} and graph["hpd.c"] == {"hpd.a"}
    assert import_cycles(graph) == [["hpd.a", "hpd.sub.b"]]


def test_no_import_cycles():
    # A cycle means two modules each need a piece of the other: move the shared piece down into a
    # module both import (a lazy import inside a function hides the cycle; it still counts here).
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles (move the shared piece into a module both import): " + "; ".join(
        " <-> ".join(c) for c in cycles)


# The top level: what every layer shares, and the way in from a user's own loop. A new module goes
# into the subpackage of the step it serves (see docs/architecture.md).
TOP_LEVEL = {"_lazy", "config", "engine", "errors", "files", "fingerprints", "integrations", "provenance", "seeds",
             "stats", "version", "vocab"}
PACKAGES = {"apps", "configuration", "data", "models", "objectives", "responses", "teachers", "training"}
MAX_LINES = 600
REASON = "Over 600 lines:"  # how a module's docstring gives its reason


def test_the_top_level_holds_only_the_shared_modules():
    found = {m.name: m.ispkg for m in pkgutil.iter_modules(hpd.__path__)}
    assert {n for n, pkg in found.items() if not pkg} == TOP_LEVEL, (
        "put a new module into the subpackage of the step it serves (teachers, responses, data, models, training)")
    assert {n for n, pkg in found.items() if pkg} == PACKAGES


def test_the_subpackages_re_export_nothing():
    # A package's __init__ is its docstring: importing `hpd.data` loads no module of it, and every
    # name is imported from the module that defines it (no second path to keep alive).
    # `hpd.objectives` is the exception: its __init__ is the registry of the objectives.
    offenders = []
    for package in sorted(PACKAGES - {"objectives", "apps"}):
        tree = ast.parse((ROOT / "hpd" / package / "__init__.py").read_text(encoding="utf-8"))
        if any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in tree.body):
            offenders.append(package)
    assert offenders == [], f"hpd.{offenders[0]}/__init__.py holds code: import from the module that defines it"


def long_modules(root: Path = ROOT) -> dict[str, int]:
    """Modules over MAX_LINES lines whose docstring does not say why (a paragraph starting with REASON)."""
    out = {}
    for path in sorted((root / "hpd").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n") + (not text.endswith("\n"))
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and not any(p.strip().startswith(REASON) for p in doc.split("\n\n")):
            out[str(path.relative_to(root))] = lines
    return out


def test_long_modules_are_caught_unless_they_say_why(tmp_path):
    (tmp_path / "hpd").mkdir()
    body = "x = 1\n" * MAX_LINES
    (tmp_path / "hpd" / "short.py").write_text('"""Short."""\n' + "x = 1\n" * (MAX_LINES - 1))
    (tmp_path / "hpd" / "long.py").write_text('"""Long."""\n' + body)
    (tmp_path / "hpd" / "said.py").write_text(f'"""Long.\n\n{REASON} one table.\n"""\n' + body)
    assert long_modules(tmp_path) == {"hpd/long.py": MAX_LINES + 1}


def test_no_module_is_over_600_lines_without_a_reason():
    assert long_modules() == {}, (f"split these modules, or start a paragraph of the docstring with "
                                  f"'{REASON}' and the reason: {long_modules()}")
