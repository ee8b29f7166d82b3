"""Config fields: `field_` (a dataclass field with its help text and checks) and the table of every
leaf field of a root config dataclass, by dotted key, that the conversion, the overrides, the checks
and the help text read.

    >>> from hpd.config import Config
    >>> from hpd.configuration.fields import describe_checks, field_table, suggest
    >>> tp, meta = field_table(Config)["optim.lr"]
    >>> tp, describe_checks(meta)
    (<class 'float'>, '> 0')
    >>> suggest("optim.lrr", field_table(Config))
    'optim.lr'
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import field
from typing import Any, Iterable, Iterator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # the keys of a mapping field (teacher.named): names for metrics and files
INT_MAX = 2**63 - 1  # the largest int any field takes (an int64)

_CHECK_KEYS = {"choices", "min", "max", "min_exclusive", "max_exclusive", "nonempty", "import_path"}


def field_(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with its help text and checks in the metadata.

    checks: ``choices=[...]``, ``min=x``, ``max=y``, ``min_exclusive=True`` / ``max_exclusive=True``
    (make the bound strict), ``nonempty=True`` (strings), ``import_path=True`` (besides the choices, a
    user's objective class as ``module:Class``). None values of optional fields skip them.
    """
    unknown = set(checks) - _CHECK_KEYS
    if unknown:  # a typo in a check would otherwise silently disable it
        raise TypeError(f"unknown field checks {sorted(unknown)}; allowed: {sorted(_CHECK_KEYS)}")
    if isinstance(default, (list, dict)):  # a list or mapping field: every Config gets its own copy
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    # Annotations are strings (from __future__ import annotations); resolve them once per class.
    return typing.get_type_hints(cls)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def split_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` / `Optional[X]`; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def sections(root: type) -> dict[str, type]:
    """The sections of the root config dataclass: name -> section dataclass."""
    return {f.name: t for f, t in top_fields(root) if is_section(t)}


def top_fields(root: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of each top-level field of `root`, sections included."""
    root_hints = hints(root)
    return [(f, root_hints[f.name]) for f in dataclasses.fields(root)]


def iter_fields(root: type, cfg: Any = None) -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """Yield ``(dotted_key, field, type, value)`` for every leaf field of `cfg` (an instance of
    `root`; None = the defaults), in declaration order."""
    cfg = root() if cfg is None else cfg
    for f, tp in top_fields(root):
        value = getattr(cfg, f.name)
        if is_section(tp):
            sub_hints = hints(tp)
            for sf in dataclasses.fields(tp):
                yield f"{f.name}.{sf.name}", sf, sub_hints[sf.name], getattr(value, sf.name)
        else:
            yield f.name, f, tp, value


@functools.cache
def field_table(root: type) -> dict[str, tuple[Any, dict[str, Any]]]:
    """dotted key -> (type, metadata: help and checks) of every leaf field."""
    return {key: (tp, dict(f.metadata)) for key, f, tp, _value in iter_fields(root)}


def field_of(root: type, key: str) -> tuple[Any, dict[str, Any]]:
    """(type, metadata) of a dotted key (an entry of a mapping field: `teacher.named.NAME.path`, its
    value's field)."""
    table = field_table(root)
    found = table.get(key)
    if found is None and (parent := mapping_field(root, key)) is not None:
        rest = key[len(parent) + 1:].split(".")
        value_t = typing.get_args(split_optional(table[parent][0])[0])[1]
        if len(rest) == 2 and rest[1] in hints(value_t):
            f = next(f for f in dataclasses.fields(value_t) if f.name == rest[1])
            return hints(value_t)[rest[1]], dict(f.metadata)
    return found or (Any, {})


def mapping_field(root: type, key: str) -> str | None:
    """The mapping field (`teacher.named`) that a longer dotted key lies under, else None."""
    for k, (tp, _meta) in field_table(root).items():
        if key.startswith(k + ".") and typing.get_origin(split_optional(tp)[0]) is dict:
            return k
    return None


def mapping_fields(root: type) -> list[str]:
    """The dotted keys of the fields whose value is a mapping of names (`teacher.named`): compared,
    saved and shown as one value."""
    return [k for k, (tp, _meta) in field_table(root).items() if typing.get_origin(split_optional(tp)[0]) is dict]


def mapping_keys(root: type, parent: str) -> list[str]:
    """The keys of one entry of the mapping field that `parent` (`teacher.named.NAME`) lies in."""
    field_key = mapping_field(root, parent)
    if field_key is None:
        return []
    return [f.name for f in dataclasses.fields(typing.get_args(split_optional(field_table(root)[field_key][0])[0])[1])]


def type_name(tp: Any) -> str:
    inner, optional = split_optional(tp)
    name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if optional else name


def describe_checks(meta: dict[str, Any]) -> str:
    """'(0, 1]', '>= 1', 'one of a|b' ... for help texts and error messages."""
    if "choices" in meta:
        return "one of " + "|".join(str(c) for c in meta["choices"]) + (" or module:Class" if meta.get("import_path") else "")
    lo, hi = meta.get("min"), meta.get("max")
    lo_x, hi_x = meta.get("min_exclusive", False), meta.get("max_exclusive", False)
    if lo is not None and hi is not None:
        return f"{'(' if lo_x else '['}{lo:g}, {hi:g}{')' if hi_x else ']'}"
    if lo is not None:
        return f"{'>' if lo_x else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_x else '<='} {hi:g}"
    return ""


def suggest(word: str, options: Iterable[str]) -> str | None:
    """The closest option to a misspelt word, or None."""
    options = list(options)
    leaf = word.rsplit(".", 1)[-1]
    # A right key in the wrong place (`lr:` at top level) is a common slip: match the leaf name.
    same_leaf = [o for o in options if o.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) >= 1 and word not in options:
        return same_leaf[0]
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_leaf = {o.rsplit(".", 1)[-1]: o for o in options}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None
