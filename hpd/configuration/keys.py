"""Reading config values: the dotted keys and their aliases (the names Hugging Face users type),
nested YAML mappings and ``key=value`` overrides, did-you-mean hints for unknown keys, and `build`:
defaults <- a mapping (a YAML file's) <- the overrides, converted by the schema.

    >>> from hpd.config import Config
    >>> cfg = build(Config, {"optim": {"learning_rate": 3e-4}}, "", ["max_steps=1e3"])
    >>> cfg.optim.lr, cfg.max_steps
    (0.0003, 1000)
    >>> parse_override("data.eval=null")
    ('data.eval', None, 'null')
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from hpd.configuration.fields import field_table, mapping_field, mapping_keys, sections, suggest
from hpd.configuration.schema import prepare, problems, raise_problems
from hpd.errors import HPDError

# --------------------------------------------------------------------------------------------
# Aliases: the names Hugging Face users type
# --------------------------------------------------------------------------------------------

# TrainingArguments' names -> our keys. Each is accepted on its own (`learning_rate: 3e-4`,
# `learning_rate=3e-4`) and inside the section of its key (`optim.learning_rate`). An alias whose
# key this version lacks is refused by name.
ALIASES: dict[str, str] = {
    "learning_rate": "optim.lr",
    "per_device_train_batch_size": "optim.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "lr_scheduler_type": "optim.schedule",
    "gradient_checkpointing": "student.gradient_checkpointing",
    "num_train_epochs": "epochs",
    "logging_steps": "log.every",
    "eval_steps": "log.eval_every",
    "report_to": "log.report_to",
    "save_steps": "save.every",
    "save_total_limit": "save.keep_last",
}

# Names we refuse with the reason, since no key means the same.
_NOT_ALIASES: dict[str, str] = {}


@functools.cache
def _alias_spellings() -> dict[str, str]:
    """Every accepted spelling of an alias (bare, and dotted under its key's section) -> its key."""
    out: dict[str, str] = {}
    for alias, key in ALIASES.items():
        out[alias] = key
        section = key.rpartition(".")[0]
        if section:
            out[f"{section}.{alias}"] = key
    return out


def _unknown_key(root: type, key: str, where: str) -> HPDError:
    spellings = _alias_spellings()
    hint = suggest(key, [*field_table(root), *spellings])
    hint = spellings.get(hint, hint)  # a close alias points at the key it stands for
    msg = f"unknown config key {key!r}{where}"
    if hint:
        msg += f"; did you mean {hint!r}?"
    return HPDError(msg + " `hpd train --help` lists every key")


def _canonical(root: type, key: str, where: str) -> str:
    """The config key that `key` names: itself, or the key of an alias (HPDError for an alias
    this version has no key for, or a refused name)."""
    if key in field_table(root):
        return key
    target = _alias_spellings().get(key)
    if target is None:
        reason = _NOT_ALIASES.get(key.rpartition(".")[2])
        if reason:
            raise HPDError(f"{key!r}{where}: {reason}")
        return key
    if target not in field_table(root):
        raise HPDError(f"{key!r}{where} stands for {target!r}, which this version of hpd does not have")
    return target


# --------------------------------------------------------------------------------------------
# Setting values
# --------------------------------------------------------------------------------------------


def _same_value(a: Any, b: Any) -> bool:
    """Whether two values read from YAML mean the same (`3e-4` is a string in YAML 1.1, 0.0003 a float)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _set(root: type, data: dict[str, Any], key: str, value: Any, *, raw: str | None = None, where: str = "",
         seen: dict[str, tuple[str, Any]] | None = None) -> None:
    """Set the dotted `key` (or an alias of one) of the nested plain dict `data` (a config's
    values) to `value`.

    seen: canonical key -> (spelling, value) of what this layer (one file, or the overrides) set
    so far; a key set under two spellings (an alias and its key) to different values is an error.
    """
    root_sections = sections(root)
    if key in root_sections:
        example = f"{key}.{dataclasses.fields(root_sections[key])[0].name}"
        raise HPDError(
            f"{key!r} is a section, not a value{where}: set its keys one by one, e.g. {example}=..."
        )
    spelled, key = key, _canonical(root, key, where)
    keys = field_table(root)
    parent = mapping_field(root, key) if key not in keys else None
    if parent is not None:  # teacher.named.NAME.path=DIR: one entry's key
        section, _, leaf = parent.rpartition(".")
        name, _, sub = key[len(parent) + 1:].partition(".")
        if not sub or "." in sub:
            raise HPDError(f"{key!r}{where}: set one key of one entry, e.g. {parent}.NAME.{mapping_keys(root, parent + '.x')[0]}=...")
        entries = (data[section] if section else data).setdefault(leaf, {})
        if not isinstance(entries.get(name, {}), dict):
            entries[name] = dataclasses.asdict(entries[name])
        entries.setdefault(name, {})[sub] = prepare(root, key, value, raw)
        return
    if key not in keys:
        raise _unknown_key(root, key, where)
    if seen is not None:
        before = seen.get(key)
        if before is not None and before[0] != spelled and not _same_value(before[1], value):
            raise HPDError(f"{before[0]!r} ({before[1]!r}) and {spelled!r} ({value!r}) both set {key!r}{where}: "
                           f"keep one of them")
        seen[key] = (spelled, value)
    section, _, leaf = key.rpartition(".")
    (data[section] if section else data)[leaf] = prepare(root, key, value, raw)


def _flatten(root: type, d: Any, where: str) -> list[tuple[str, Any]]:
    """Nested mapping -> [(dotted_key, value)]; sections must be mappings."""
    if d is None:
        return []
    if not isinstance(d, dict):
        raise HPDError(
            f"config{where} must be a mapping of keys to values (like `max_steps: 20`), "
            f"got {type(d).__name__}"
        )
    root_sections = sections(root)
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        k = str(k)
        if k in root_sections:
            if v is None:
                continue  # an empty section (`optim:`) keeps the defaults
            if not isinstance(v, dict):
                raise HPDError(
                    f"{k}: expected a mapping of {k}.* keys "
                    f"(e.g. `{k}:` then indented `key: value` lines), got {v!r}{where}"
                )
            for sk, sv in v.items():
                if isinstance(sv, dict) and mapping_field(root, f"{k}.{sk}.x") != f"{k}.{sk}":
                    raise _unknown_key(root, f"{k}.{sk}.{next(iter(sv), '')}".rstrip("."), where)
                items.append((f"{k}.{sk}", sv))
        elif isinstance(v, dict):
            raise _unknown_key(root, k, where)
        else:
            items.append((k, v))
    return items


# --------------------------------------------------------------------------------------------
# Files, overrides and the values they give
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any, str]:
    """``key=value`` -> (key, the value as YAML reads it, the text after '=')."""
    if "=" not in text:
        raise HPDError(
            f"override {text!r} must look like key=value, e.g. optim.lr=3e-4 or max_steps=20"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise HPDError(f"override {text!r} has no key before '=', e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own (e.g. 'a: b'): let the field type decide
    return key, value, raw


def read_file(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """(the YAML config file's contents, where: ' (in PATH)' for messages); HPDError for a missing,
    malformed or empty file."""
    p = Path(path)
    if not p.is_file():
        raise HPDError(
            f"config file '{p}' not found; pass the path of a YAML file "
            f"(`hpd config --out {p}` writes a default one)"
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise HPDError(f"config file '{p}' is not valid YAML: {e}") from None
    if data is None:
        raise HPDError(
            f"config file '{p}' is empty (no settings): write the keys you want in it "
            f"(`hpd config --out {p}` writes a default one)"
        )
    return data, f" (in {p})"


def build(root: type, d: Any, where: str, overrides: Iterable[str]) -> Any:
    """An instance of `root`: defaults <- the mapping `d` <- the overrides, converted and checked by
    the schema (the checks across sections are the caller's: `hpd.config.validate`)."""
    data = dataclasses.asdict(root())
    seen: dict[str, tuple[str, Any]] = {}
    for key, value in _flatten(root, d, where):
        _set(root, data, key, value, where=where, seen=seen)
    seen = {}  # an override replaces what the file set, under any spelling
    for text in overrides:
        key, value, raw = parse_override(text)
        _set(root, data, key, value, raw=raw, where=f" (in override {text!r})", seen=seen)
    model, found = problems(root, data, strict=False)
    raise_problems(found)
    values = model.model_dump()
    parts = {name: cls(**values.pop(name)) for name, cls in sections(root).items()}
    return root(**values, **parts)
