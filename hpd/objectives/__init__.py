"""Distillation objectives in one unified, token-weighted view.

`OBJECTIVES` is the one registry: an objective is a class (its parameters declared on it, as
`Param`s) listed there; the config, `hpd train --help` and validation are derived from it, and a
user's own objective outside the package loads by import path (`objective.name=mypkg.losses:MyKL`).
`get_objective(name, **params)` returns an objective; calling it with aligned student logits
`(B, T, V)`, a teacher and labels `(B, T)` aligned with them (`labels[:, t]` is the token
`logits[:, t]` predicts; `shift_labels` turns Hugging Face's unshifted labels into those, and
labels that look unshifted are refused) returns an `ObjectiveOutput` (`.loss`, `.value`,
`.metrics`). `.chunked(hidden, lm_head, teacher, labels)` (an `LMHead` or its weight) computes the same loss without
ever holding `(B, T, V)` logits. See `docs/objectives.md` for the mathematics.

    >>> import torch
    >>> from hpd.objectives import get_objective, OBJECTIVES
    >>> sorted(OBJECTIVES)
    ['abkl', 'akl', 'fkl', 'hpd', 'hpdk', 'jsd', 'orkl', 'rkl', 'sft', 'skl', 'srkl', 'todi', 'tvd', 'uld']
    >>> obj = get_objective("skl", alpha=0.2)
    >>> out = obj(torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    >>> out.loss.backward()
"""

from __future__ import annotations

import importlib

from hpd.errors import HPDError
from hpd.objectives.base import (
    COMMON_PARAMS, IGNORE_INDEX, Objective, ObjectiveOutput, Param, TeacherChunk, TokenWeights, reduce_metrics,
    refuse_unshifted_labels, shift_labels,
)
from hpd.objectives.divergences import (
    AdaptiveKL, AlphaBetaDivergence, ForwardKL, JensenShannon, ReverseKL, SkewForwardKL, SkewReverseKL, TokenwiseDivergence, TotalVariation,
    UniversalLogitDistillation,
)
from hpd.objectives.sampled import SFT, HybridPolicy, HybridPolicyTopK, OnPolicyReverseKL
from hpd.vocab import resolve_shared_vocab

# The loss routine and the teacher views need torch at import (an autograd.Function): they load on
# first access, so that the registry (and with it the config and `hpd train --help`) stays torch-free.
_FROM_SURROGATE = (
    "DEFAULT_CHUNK_SIZE", "GatheredTeacher", "HeadTeacher", "LogitsTeacher", "TeacherView", "TopKTeacher",
    "as_teacher_view", "chunked_objective_loss", "objective_loss", "rollout_weights",
)


_FROM_CLIP = ("RatioClip", "RolloutWeights")
_FROM_HEAD = ("LMHead", "LogitTransform")


def __getattr__(name: str):
    if name in _FROM_SURROGATE:
        return getattr(importlib.import_module("hpd.objectives.surrogate"), name)
    if name in _FROM_CLIP:
        return getattr(importlib.import_module("hpd.objectives.clip"), name)
    if name in _FROM_HEAD:
        return getattr(importlib.import_module("hpd.objectives.head"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        SFT, ForwardKL, ReverseKL, JensenShannon, SkewForwardKL, SkewReverseKL, TotalVariation, AdaptiveKL,
        TokenwiseDivergence, AlphaBetaDivergence, OnPolicyReverseKL, HybridPolicy, HybridPolicyTopK,
        UniversalLogitDistillation,
    )
}


def objective_class(name: str) -> type[Objective]:
    """The objective registered as `name`, or a user's `Objective` subclass named `module:Class`.

    A user's class is imported (its module must be importable, e.g. on PYTHONPATH) and must
    declare `name`, `support` and `weights`; its `params` are declared as the built-ins' are.
    """
    cls = OBJECTIVES.get(name)
    if cls is not None:
        return cls
    if ":" not in name:
        raise HPDError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}, or name your own "
                       "Objective subclass by import path, module:Class")
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        raise HPDError(f"objective {name!r}: cannot import module {module!r} ({e}); put it on PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise HPDError(f"objective {name!r}: {module} has no Objective subclass named {attr!r}")
    missing = [a for a in ("name", "support") if not hasattr(cls, a)]
    if missing or cls.weights is Objective.weights:
        raise HPDError(f"objective {name!r}: the class must declare name, support and weights "
                       f"(missing: {', '.join(missing) or 'weights'})")
    return cls


def get_objective(name: str, **params: float) -> Objective:
    """The objective `name` (or `module:Class`) with its parameters; `HPDError` lists what is allowed."""
    return objective_class(name)(**params)


def param_fields(cls: type[Objective]) -> dict[str, str]:
    """An objective's parameters -> the config fields (`objective.<field>`) that hold them."""
    return {name: p.field_name(name) for name, p in cls.params.items()}


def config_params() -> dict[str, list[tuple[str, Param]]]:
    """Every config field of the objectives' parameters -> (objective, its Param) for each
    objective reading it ("" for the parameters every objective takes), in registry order."""
    out: dict[str, list[tuple[str, Param]]] = {}
    for oname, cls in OBJECTIVES.items():
        for pname, p in cls.params.items():
            users = out.setdefault(p.field_name(pname), [])
            if users and not users[0][1].same_range(p):
                raise TypeError(f"objective {oname!r} declares config field {p.field_name(pname)!r} with another "
                                f"default or range than {users[0][0]!r}: give it its own Param.key")
            users.append((oname, p))
    for pname, p in COMMON_PARAMS.items():
        out[pname] = [("", p)]
    return out


def describe_objectives() -> str:
    """One line per objective: name, parameters with ranges, summary."""
    lines = []
    for name, cls in OBJECTIVES.items():
        ps = ", ".join(f"{k}={p.default:g} {p.describe()}" for k, p in cls.params.items())
        lines.append(f"{name:5s} {('(' + ps + ') ') if ps else ''}{cls.summary}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_CHUNK_SIZE", "GatheredTeacher", "HeadTeacher", "IGNORE_INDEX", "LogitsTeacher", "TeacherView", "as_teacher_view", "OBJECTIVES", "Objective", "ObjectiveOutput",
    "Param", "TeacherChunk", "COMMON_PARAMS", "config_params", "objective_class", "param_fields", "TokenWeights", "TopKTeacher", "chunked_objective_loss", "describe_objectives", "get_objective",
    "objective_loss", "reduce_metrics", "refuse_unshifted_labels", "resolve_shared_vocab", "shift_labels",
    "RatioClip", "RolloutWeights", "rollout_weights", "LMHead", "LogitTransform",
]
