"""The config as text: YAML (`save_config`, the `config.yaml` of every run), YAML with each key's
help as a comment (`hpd config --out`), and the plain-text reference of every key that
`hpd train --help` prints and the docs' config page shows.

    >>> from hpd.config import Config
    >>> print(to_yaml(Config()).splitlines()[0])
    output_dir: runs/hpd
    >>> print(config_help(Config).splitlines()[3])
    top level:
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

import yaml

from hpd.configuration.fields import describe_checks, field_table, iter_fields, sections, type_name
from hpd.configuration.keys import ALIASES


def yaml_scalar(value: Any) -> str:
    """One value as YAML on one line."""
    # Dump inside a flow list so YAML quotes what needs quoting ('on', '1e-3' strings...) and no
    # document-end marker is added; then strip the brackets.
    if isinstance(value, dict):  # a mapping field's entries (teacher.named) as plain mappings
        value = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
    text = yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()
    return text[1:-1]


def to_yaml(cfg: Any, comments: bool = False) -> str:
    """The config as YAML (``comments=True`` adds each field's help as a comment)."""
    if not comments:
        return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False)
    root = type(cfg)
    lines = [
        "# hpd run config. Every key is optional (defaults shown); override any with key=value,",
        "# e.g. `hpd train this.yaml optim.lr=3e-4 max_steps=20`. `hpd train --help` explains all.",
    ]
    current_section = None
    for key, f, _tp, value in iter_fields(root, cfg):
        section, _, leaf = key.rpartition(".")
        if section and section != current_section:
            current_section = section
            lines += ["", f"{section}:  # {sections(root)[section].__doc__.strip()}"]
        indent = "  " if section else ""
        checks = describe_checks(f.metadata)
        comment = f.metadata["help"] + (f" ({checks})" if checks else "")
        lines += textwrap.wrap(
            comment, width=96, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   "
        )
        lines.append(f"{indent}{leaf}: {yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def config_help(root: type, width: int = 88) -> str:
    """A plain-text reference of every key of the root config dataclass: dotted key, type, default,
    allowed values, help; line breaks are meant to be kept as they are."""
    lines = [
        "Config keys (YAML file sections, or key=value overrides such as optim.lr=3e-4 or",
        "max_steps=20; null/none sets an optional key to None):",
    ]
    current = None
    for key, f, tp, value in iter_fields(root):
        section = key.rpartition(".")[0] or "top level"
        if section != current:
            current = section
            if section == "top level":
                lines += ["", "top level:"]
            else:
                doc = sections(root)[section].__doc__.strip().rstrip(".")
                lines += ["", f"{section}:  {doc}"]
        checks = describe_checks(f.metadata)
        default = "null" if value is None else yaml_scalar(value)
        head = f"  {key}  ({type_name(tp)}, default {default}{'; ' + checks if checks else ''})"
        lines.append(head)
        lines += textwrap.wrap(
            f.metadata["help"], width=width, initial_indent="      ", subsequent_indent="      "
        )
    lines += ["", "Hugging Face names (aliases): each is accepted for its key, on its own or under the key's",
              "section (learning_rate=3e-4 or optim.learning_rate=3e-4); setting both to different values",
              "is an error."]
    lines += [f"  {alias}  ->  {key}" for alias, key in ALIASES.items() if key in field_table(root)]
    return "\n".join(lines)
