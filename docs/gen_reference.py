"""Write the reference pages from the code at build time (run by mkdocs-gen-files).

The config keys come from the typed config (`hpd.config.config_help`), the command line from the
typer app's own click commands, the Python API from the docstrings (one mkdocstrings page per
library module), so a reference page cannot disagree with the code it documents.

    python docs/gen_reference.py --print cli   # the CLI page on stdout, without mkdocs
"""

from __future__ import annotations

import pkgutil
import sys

import click


def config_page() -> str:
    from hpd.config import config_help

    return (
        "# Config keys\n\n"
        "Every key of `hpd train`, with its type, default and range; set them in YAML or as\n"
        "`key=value` after the config file. Generated from `hpd.config` (`hpd train --help`\n"
        "prints the same).\n\n```text\n" + config_help().rstrip() + "\n```\n"
    )


def cli_page() -> str:
    import typer

    from hpd.apps.cli import app

    group = typer.main.get_command(app)
    parts = ["# Command line\n\nEvery `hpd` command and its options, from the command definitions.\n"]
    root = click.Context(group, info_name="hpd")
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        ctx = click.Context(command, info_name=f"hpd {name}", parent=root, terminal_width=100, max_content_width=100)
        parts.append(f"## hpd {name}\n\n```text\n{command.get_help(ctx).rstrip()}\n```\n")
    return "\n".join(parts)


def library_modules() -> list[str]:
    """The public modules of the package, applications included, in import-path order."""
    import hpd

    names = [info.name for info in pkgutil.walk_packages(hpd.__path__, "hpd.")
             if not any(part.startswith("_") for part in info.name.split("."))]
    return sorted(names)


def summary(name: str) -> str:
    """The first line of a module's docstring, read from its source (nothing is imported)."""
    import ast

    path = ROOT.joinpath(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def api_pages() -> dict[str, str]:
    """One page per module; the index groups them by folder (the order of a step), each module
    with the first line of its docstring."""
    pages = {}
    index = ["# Python API\n", "Generated from the docstrings, one page per module, grouped by folder.\n"]
    groups: dict[str, list[str]] = {}
    for name in library_modules():
        pages[f"reference/api/{name}.md"] = f"# `{name}`\n\n::: {name}\n"
        parts = name.split(".")
        package = ".".join(parts[:2]) if len(parts) > 2 or (ROOT / "hpd" / parts[1]).is_dir() else "hpd"
        groups.setdefault(package, []).append(name)
    # The library in the order of a step, then the applications.
    order = ["hpd", "hpd.configuration", "hpd.data", "hpd.responses", "hpd.teachers", "hpd.models", "hpd.objectives", "hpd.training"]
    for package, names in sorted(groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])):
        index.append(f"\n## `{package}`\n")
        index.extend(f"- [`{n}`](api/{n}.md): {summary(n)}" for n in names)
    pages["reference/api.md"] = "\n".join(index) + "\n"
    return pages


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def home_page() -> str:
    """The README, the project's front door, as the site's home page (its links made site-relative)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.replace("](docs/", "](").replace("](benchmarks/RESULTS.md", "](results.md")


def results_page() -> str:
    """benchmarks/RESULTS.md, where every measured table lives, as the site's results section."""
    return (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")


def pages() -> dict[str, str]:
    history = (ROOT / "benchmarks" / "results" / "HISTORY.md").read_text(encoding="utf-8")
    out = {"index.md": home_page(), "results.md": results_page(), "results/HISTORY.md": history,
           "reference/config.md": config_page(), "reference/cli.md": cli_page()}
    out.update(api_pages())
    return out


def main() -> None:
    if "--print" in sys.argv:
        key = sys.argv[sys.argv.index("--print") + 1]
        print({"config": config_page, "cli": cli_page}[key]())
        return
    import mkdocs_gen_files

    for path, text in pages().items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)


main()
