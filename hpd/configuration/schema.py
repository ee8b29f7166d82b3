"""The conversion and checks of config values on pydantic v2: a model derived from a root config
dataclass (each field's range, choices and help declared once, in `field_`) converts the values and
collects every type, range and choice error, turned here into one-line messages naming the dotted key.

We chose pydantic over OmegaConf because it checks ranges and choices itself (OmegaConf checks only
types) and is already a dependency of transformers; the dataclasses stay plain. pydantic is imported
where the model is built, on first use (`hpd train --help` never needs it).

    >>> from hpd.config import Config, config_to_dict
    >>> data = config_to_dict(Config())
    >>> data["optim"]["lr"] = -1.0
    >>> problems(Config, data, strict=True)[1]
    ['optim.lr: must be > 0, got -1.0']
    >>> prepare(Config, "max_steps", "1e3", None)  # YAML 1.1 reads 1e3 as a string
    1000
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal

from hpd.configuration.fields import (
    INT_MAX,
    NAME_PATTERN,
    describe_checks,
    field_of,
    hints,
    is_section,
    mapping_keys,
    split_optional,
    suggest,
)
from hpd.errors import HPDError
from hpd.objectives import OBJECTIVES, objective_class

if TYPE_CHECKING:  # pydantic is imported where the schema is built (`hpd train --help` never needs it)
    from pydantic import BaseModel

_NONE_WORDS = {"null", "none", "~", ""}


def _objective_name(value: str) -> str:
    """objective.name: a registered name, or a user's class by import path (checked by importing it)."""
    if ":" in value:
        objective_class(value)  # HPDError (a ValueError) says what is wrong with the path
    elif value not in OBJECTIVES:
        from pydantic_core import PydanticCustomError

        raise PydanticCustomError("choice", "not a registered objective")
    return value


def _field_type(tp: Any, meta: dict[str, Any]) -> Any:
    """The pydantic type of one field: its Python type with the range/choice/non-empty checks of
    its metadata as constraints (inside `Optional`, so that None skips them)."""
    from pydantic import AfterValidator, Field

    inner, optional = split_optional(tp)
    constraints: dict[str, Any] = {}
    if meta.get("min") is not None:
        constraints["gt" if meta.get("min_exclusive") else "ge"] = meta["min"]
    if meta.get("max") is not None:
        constraints["lt" if meta.get("max_exclusive") else "le"] = meta["max"]
    elif inner is int:
        constraints["le"] = INT_MAX  # seeds and counts end up in int64 tensors and C longs
    if meta.get("nonempty"):
        constraints["pattern"] = r"\S"  # at least one non-blank character
    if typing.get_origin(inner) is dict:  # a mapping of names to a small section (teacher.named)
        key_t, value_t = typing.get_args(inner)
        inner = dict[Annotated[key_t, Field(pattern=NAME_PATTERN)], _model_of(value_t)]
    elif meta.get("import_path"):
        inner = Annotated[inner, AfterValidator(_objective_name)]
    elif "choices" in meta and typing.get_origin(inner) is list:
        inner = list[Literal[tuple(meta["choices"])]]  # a list field: each item one of the choices
    elif "choices" in meta:
        inner = Literal[tuple(meta["choices"])]
    typed = Annotated[inner, Field(**constraints)] if constraints else inner
    return typed | None if optional else typed


def _model_of(cls: type) -> type[BaseModel]:
    """A pydantic model with the fields (types, checks, defaults) of the dataclass `cls`."""
    from pydantic import ConfigDict, Field, create_model

    cls_hints = hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = cls_hints[f.name]
        if is_section(tp):
            fields[f.name] = (_model_of(tp), ...)
        else:
            default = f.default if f.default is not dataclasses.MISSING else Field(default_factory=f.default_factory)
            fields[f.name] = (_field_type(tp, dict(f.metadata)), default)
    config = ConfigDict(extra="forbid", allow_inf_nan=False)
    return create_model(cls.__name__, __config__=config, **fields)


@functools.cache
def _schema(root: type) -> type[BaseModel]:
    # Built on first use, not at import: `hpd train --help` reads only the dataclasses.
    return _model_of(root)


def problems(root: type, data: dict[str, Any], strict: bool) -> tuple[Any, list[str]]:
    """Validate a nested plain dict against the schema of `root`: (the validated model or None, messages).

    strict: types must already be right (a config built in Python); otherwise pydantic converts
    (``'1e-3'`` -> 0.001, ``'yes'`` -> True, 30.0 -> 30), after `prepare` has applied our own rules.
    """
    from pydantic import ValidationError

    try:
        return _schema(root).model_validate(data, strict=strict), []
    except ValidationError as e:
        return None, [_message(root, err) for err in e.errors()]


def raise_problems(problems: list[str]) -> None:
    """HPDError with the one problem, or all of them one per line; nothing when there are none."""
    if len(problems) == 1:
        raise HPDError(problems[0])
    if problems:
        raise HPDError(f"{len(problems)} config problems:\n  " + "\n  ".join(problems))


def _message(root: type, err: Any) -> str:
    """One pydantic error -> our one-line message naming the dotted key, the rule and the value."""
    # An item of a list field is located by its index: the message names the field.
    key = ".".join(str(part) for part in err["loc"] if not isinstance(part, int))
    kind, value = err["type"], err["input"]
    tp, meta = field_of(root, key)
    if kind == "less_than_equal" and meta.get("max") is None:
        return f"{key}: must be at most {INT_MAX} (an int64), got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "choice", "literal_error"):
        msg = f"{key}: must be {describe_checks(meta)}, got {value!r}"
        hint = suggest(str(value), [str(c) for c in meta["choices"]]) if "choices" in meta else None
        return msg + (f" (did you mean {hint!r}?)" if hint else "")
    if kind == "string_pattern_mismatch" and tp is Any:  # a key of a mapping field (teacher.named)
        return f"{key.rpartition('.')[0]}: {value!r} is not a name (letters, digits, '_', '.', '-'; a letter or digit first)"
    if kind == "string_pattern_mismatch":
        return f"{key}: must not be empty"
    if kind == "extra_forbidden":
        parent = key.rpartition(".")[0]
        return f"{key}: unknown key; {parent} takes {', '.join(sorted(mapping_keys(root, parent)))}"
    if kind == "finite_number":
        return f"{key}: expected a finite float, got {value!r}"
    if kind == "value_error":
        return f"{key}: {err['ctx']['error']}"
    if kind in ("model_type", "dataclass_type"):
        return f"{key}: expected a mapping of {key}.* keys, got {value!r}"
    return str(type_error(key, tp, value))


def type_error(key: str, tp: Any, value: Any) -> HPDError:
    inner, optional = split_optional(tp)
    article = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}
    what = article.get(inner, getattr(inner, "__name__", str(inner)))
    if typing.get_origin(inner) is list:
        what = "a list ([a, b] in YAML, a,b in an override)"
    if optional:
        what += " or null"
    return HPDError(f"{key}: expected {what}, got {value!r}")


def prepare(root: type, key: str, value: Any, raw: str | None) -> Any:
    """Our reading of a YAML / override value where it differs from pydantic's lax conversion.

    raw: the override's text after '=' (None for values from a file or a dict).
    """
    tp, meta = field_of(root, key)
    inner, optional = split_optional(tp)
    # 'none' is a word only for optional fields: teacher.path=none stays the string 'none'.
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if inner is str and value is not None:
        if raw is not None:
            # Overrides: take the text as typed (`output_dir=2024` stays '2024', `tensorboard=off`
            # stays 'off'), unless it was quoted on purpose.
            text = raw.strip()
            return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
        if isinstance(value, bool):
            # YAML 1.1 reads unquoted on/off/yes/no as booleans (`tensorboard: off`,
            # `mixed_precision: no`): map them back to the word when it is one of the choices.
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            for word in words:
                if word in meta.get("choices", ()):
                    return word
            raise HPDError(
                f"{key}: expected a string, got {value!r} (YAML reads unquoted yes/no/on/off as "
                f"booleans: quote the value)"
            )
        return str(value) if isinstance(value, (int, float)) else value
    if typing.get_origin(inner) is list:
        # `log.report_to=wandb,mlflow` (or a YAML string): comma-separated items
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
    if inner in (int, float) and isinstance(value, bool):
        raise type_error(key, tp, value)  # pydantic reads True as 1; a step count never is
    if inner is int and isinstance(value, str):
        try:  # '1e3' -> 1000 (YAML 1.1 reads an exponent without a dot as a string)
            number = float(value)
        except ValueError:
            return value
        return int(number) if math.isfinite(number) and number.is_integer() else value
    if inner is float and isinstance(value, int):
        return float(value)  # so that range messages show 0.0, as the value will be stored
    return value
