"""Move hpd's flat modules into the subpackages of issue 34 (teachers, responses, data, models,
training) and rewrite every reference to their old paths across the tree. Idempotent: run it again
on a moved tree (after merging a branch that still imports the old paths) and it rewrites only
what still names an old path; nothing already new is touched.

    python scripts/relayout.py                  # every package: git mv + rewrite
    python scripts/relayout.py teachers data    # those packages' moves, then the rewrite of all moved ones
    python scripts/relayout.py --rewrite-only   # no move: rewrite old paths in every tracked text file
    python scripts/relayout.py --check          # exit 1 listing the files that still name an old path

An old module may have been split into several (`hpd.data` -> `hpd.data.rows`, `hpd.data.encode`,
`hpd.data.collate`, `hpd.data.order`): a name is sent to the new module that defines it (found by parsing the new
modules), `from hpd.data import a, b` becomes one import per defining module, and a bare module
reference goes to the first. Rewritten: dotted paths (`hpd.teacher_cache.build_teacher_cache`,
`"hpd.trainer.load_models"` monkeypatch targets, `import hpd.checkpoint as ck`), `from` imports
(one line or parenthesized), file paths (`hpd/teachers.py`), in every git-tracked UTF-8 text file
except this script, its test (whose inputs are old paths) and the history (benchmarks/results/HISTORY.md),
which keeps the paths of its day.
`from hpd import <old module>` is reported, not rewritten (none existed when this was written).
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> {old top-level module: [new modules under the package; the first gets the file and
# bare references, the others are what the old module was later split into]}.
PACKAGES: dict[str, dict[str, list[str]]] = {
    "teachers": {
        "teachers": ["sources"],
        "teacher_cache": ["cache"],
        "served": ["served"],
        "cross_tokenizer": ["cross_tokenizer"],
    },
    "responses": {
        "regimes": ["regimes"],
        "rollout": ["rollout"],
        "vllm_generate": ["vllm_generate"],
        "backends": ["backends"],
        "generation_cache": ["generation_cache"],
    },
    "data": {
        "data": ["rows", "encode", "collate", "order"],
        "hub_data": ["hub"],
        "streaming": ["streaming"],
        "packing": ["packing"],
        "batches": ["batches"],
    },
    "models": {
        "models": ["loading", "head", "from_teacher"],
        "tokenizer": ["tokenizer"],
        "hub": ["hub"],
        "portable": ["portable"],
        "model_card": ["model_card"],
    },
    "training": {
        "trainer": ["trainer", "setup", "step"],
        "checkpoint": ["checkpoint"],
        "resume": ["resume"],
        "run_dir": ["run_dir"],
        "distributed": ["distributed"],
        "schedule": ["schedule"],
        "progress": ["progress"],
        "trackers": ["trackers"],
        "metrics_file": ["metrics_file"],
    },
}

INIT_DOCS = {
    "teachers": "Teacher sources: where the teacher's view of a batch comes from (a model in this process, a\n"
                "top-K cache, a pool of servers, another tokenizer's model, the student itself for OPSD).",
    "responses": "Response sources: what the student is trained on after each prompt (the dataset's completion,\n"
                 "the teacher's generations, the student's rollouts, a mix) and the generation backends.",
    "data": "Training data: rows from files and the Hub, their encoding with label masks, batches, packing,\n"
            "the streamed source and the resumable order.",
    "models": "Models: loading and saving (HF directories, Hub ids, GGUF, tiny models with a byte tokenizer),\n"
              "the LM-head view the chunked losses read, students built from a teacher's layers.",
    "training": "The training run: the loop (`trainer.py`), what it is built from (`setup.py`), checkpoints and\n"
                "resume, the run directory, several processes, the schedule, progress, metrics and trackers.",
}
SKIP = {"scripts/relayout.py", "tests/test_relayout.py", "benchmarks/results/HISTORY.md"}  # the last: history


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def module_path(dotted: str) -> Path:
    return ROOT.joinpath(*dotted.split(".")).with_suffix(".py")


def move(package: str) -> None:
    pkg = ROOT / "hpd" / package
    pkg.mkdir(exist_ok=True)
    init = pkg / "__init__.py"
    if not init.exists():
        init.write_text(f'"""{INIT_DOCS[package]}\n"""\n', encoding="utf-8")
        git("add", str(init.relative_to(ROOT)))
    for old, new in PACKAGES[package].items():
        src, dst = ROOT / "hpd" / f"{old}.py", pkg / f"{new[0]}.py"
        if src.exists() and dst.exists():
            sys.exit(f"both {src.relative_to(ROOT)} and {dst.relative_to(ROOT)} exist: merge the old file's "
                     "changes into the new one by hand, delete the old one, run again")
        if src.exists():
            git("mv", str(src.relative_to(ROOT)), str(dst.relative_to(ROOT)))
            print(f"moved hpd/{old}.py -> {dst.relative_to(ROOT)}")


def imported_names(path: Path) -> set[str]:
    """The names a module binds at top level by importing them (a name others may import from it)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def defined_names(path: Path) -> set[str]:
    """The names a module defines at top level (not the ones it imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


class Mapping:
    """Old module -> the new modules that exist now, and the new module of each name."""

    def __init__(self) -> None:
        self.new: dict[str, list[str]] = {}   # "hpd.data" -> ["hpd.data.rows", ...] (existing ones)
        self.owners: dict[str, dict[str, str]] = {}
        self.submodules: dict[str, set[str]] = {}  # "hpd.data" -> {"rows", ...}: already-new suffixes
        self.primaries: set[str] = set()  # "hpd.data.rows": the first part of a split module
        for package, modules in PACKAGES.items():
            for old, news in modules.items():
                if (ROOT / "hpd" / f"{old}.py").exists():
                    continue  # not moved yet
                existing = [f"hpd.{package}.{n}" for n in news if module_path(f"hpd.{package}.{n}").exists()]
                if not existing:
                    continue
                key = f"hpd.{old}"
                self.new[key] = existing
                owners: dict[str, str] = {}
                # A name goes to the part that defines it (the first, if several do), else to a part
                # that imports it (a name the old module re-exported, e.g. IGNORE_INDEX).
                for mod in reversed(existing):
                    owners.update(dict.fromkeys(imported_names(module_path(mod)), mod))
                for mod in reversed(existing):
                    owners.update(dict.fromkeys(defined_names(module_path(mod)), mod))
                self.owners[key] = owners
                if len(existing) > 1:  # the old module was split: its first part may still be named
                    self.new[existing[0]] = existing  # for a name that moved on to a sibling
                    self.owners[existing[0]] = owners
                    self.primaries.add(existing[0])
            pkg = ROOT / "hpd" / package
            if pkg.is_dir():
                self.submodules[f"hpd.{package}"] = {p.stem for p in pkg.glob("*.py")} | {
                    p.name for p in pkg.iterdir() if (p / "__init__.py").exists()}

    def stays(self, old: str, name: str | None) -> bool:
        """Whether `old.name` is already right: `old` is the first part of a split module and `name`
        is not defined in one of the other parts."""
        return old in self.primaries and self.target(old, name) == old

    def target(self, old: str, name: str | None) -> str:
        if name is not None and name in self.owners[old]:
            return self.owners[old][name]
        return self.new[old][0]


def _dotted_pattern(olds: list[str]) -> re.Pattern:
    alternation = "|".join(re.escape(o) for o in sorted(olds, key=len, reverse=True))
    return re.compile(rf"(?<![\w.])({alternation})(?![\w])(?:\.(\w+))?")


def _imports_module(match: re.Match) -> bool:
    """Whether the match is the module of an `import hpd.x as y` statement."""
    line_start = match.string.rfind("\n", 0, match.start()) + 1
    before, after = match.string[line_start:match.start()], match.string[match.end():]
    return before.strip() == "import" and after.startswith(" as ")


def rewrite_text(text: str, m: Mapping) -> tuple[str, list[str]]:
    warnings: list[str] = []
    olds = list(m.new)
    if not olds:
        return text, warnings

    # 1. `from hpd.old import a, b as c` (one line or parenthesized): one import per defining module.
    # (also inside code strings: "...\\nfrom hpd.data import x\\n...", or after `; `)
    imp = re.compile(
        r"(?P<indent>^[ \t]*(?:(?:>>>|\.\.\.) )?|(?<=\\n)|(?<=; ))"
        rf"from (?P<mod>{'|'.join(re.escape(o) for o in olds)}) import "
        r"(?P<names>\([^)]*\)|\w+(?: as \w+)?(?:[ \t]*,[ \t]*\w+(?: as \w+)?)*)", re.M)

    def fix_import(match: re.Match) -> str:
        old, indent = match["mod"], match["indent"]
        raw = match["names"].strip().strip("()")
        items = [i.strip() for i in raw.replace("\n", " ").split(",") if i.strip()]
        if len(items) == 1 and items[0].split(" as ")[0].strip() in m.submodules.get(old, ()):
            return match.group(0)  # `from hpd.data import rows`: already new
        if all(m.stays(old, i.split(" as ")[0].strip()) for i in items):
            return match.group(0)
        groups: dict[str, list[str]] = {}
        for item in items:
            groups.setdefault(m.target(old, item.split(" as ")[0].strip()), []).append(item)
        parenthesized = match["names"].strip().startswith("(")
        in_string = match.start() > 0 and indent == "" and match.string[match.start() - 1] != "\n"
        lines = []
        for mod, names in groups.items():
            line = f"{indent}from {mod} import {', '.join(names)}"
            if parenthesized and len(line) > 120:
                line = f"{indent}from {mod} import (\n{indent}    {', '.join(names)},\n{indent})"
            lines.append(line)
        sep = "; " if match.string[max(0, match.start() - 2):match.start()] == "; " else (
            "\\n" if in_string else "\n")
        return sep.join(lines)

    text = imp.sub(fix_import, text)

    # 2. dotted paths: hpd.old, hpd.old.name (a name of the old module, or already a new submodule).
    dotted = _dotted_pattern(olds)

    def fix_dotted(match: re.Match) -> str:
        old, attr = match[1], match[2]
        if attr is not None and attr in m.submodules.get(old, ()):
            return match.group(0)  # hpd.data.rows...: already new
        if m.stays(old, attr):
            return match.group(0)
        if attr is None and old in m.submodules and not _imports_module(match):
            return match.group(0)  # bare `hpd.data`: the package now (an `import hpd.data as d` is rewritten)
        mod = m.target(old, attr)
        return mod + (f".{attr}" if attr is not None else "")

    text = dotted.sub(fix_dotted, text)

    # 2b. monkeypatch.setattr(hpd.old, "name", ...): the module that defines the name now.
    def fix_setattr(match: re.Match) -> str:
        module, name = match[2], match[3]
        if module not in m.new or m.stays(module, name):
            return match.group(0)
        return f'{match[1]}{m.target(module, name)}, "{name}"'

    text = re.sub(r'(setattr\()(hpd(?:\.\w+)+), "(\w+)"', fix_setattr, text)

    # 3. file paths: hpd/old.py -> hpd/package/new.py (the first new module).
    for old, news in m.new.items():
        if old in m.primaries:
            continue
        old_path = old.replace(".", "/") + ".py"
        text = re.sub(rf"(?<![\w/.]){re.escape(old_path)}", news[0].replace(".", "/") + ".py", text)

    for found in re.finditer(r"from hpd import ([\w, ]+)", text):
        names = {n.strip().split(" as ")[0] for n in found[1].split(",")}
        if names & {o.split(".", 1)[1] for o in olds}:
            warnings.append(f"`{found.group(0)}` names a moved module: rewrite it by hand")
    return text, warnings


def tracked_text_files() -> list[Path]:
    out = []
    for rel in git("ls-files").splitlines():
        if rel in SKIP or rel.startswith("hpd/assets/"):
            continue
        path = ROOT / rel
        if path.is_file() and not path.is_symlink():
            out.append(path)
    return out


def rewrite_all(check: bool = False) -> list[str]:
    m = Mapping()
    changed = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        new, warnings = rewrite_text(text, m)
        for w in warnings:
            print(f"{path.relative_to(ROOT)}: {w}", file=sys.stderr)
        if new != text:
            changed.append(str(path.relative_to(ROOT)))
            if not check:
                path.write_text(new, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="*", help=f"packages to move (default: all): {', '.join(PACKAGES)}")
    ap.add_argument("--rewrite-only", action="store_true", help="move nothing, rewrite old paths")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file names an old path")
    args = ap.parse_args(argv)
    unknown = set(args.packages) - set(PACKAGES)
    if unknown:
        ap.error(f"unknown packages {sorted(unknown)}; choose from {list(PACKAGES)}")
    if not (args.rewrite_only or args.check):
        for package in args.packages or PACKAGES:
            move(package)
    changed = rewrite_all(check=args.check)
    for rel in changed:
        print(("names an old path: " if args.check else "rewrote ") + rel)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
