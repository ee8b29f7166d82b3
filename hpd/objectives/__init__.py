"""Distillation objectives in one unified, token-weighted view.

`get_objective(name, **params)` returns an objective; calling it with aligned student logits
`(B, T, V)`, a teacher and labels `(B, T)` returns an `ObjectiveOutput` (`.loss`, `.value`,
`.metrics`). `.chunked(hidden, lm_head_weight, teacher, labels)` computes the same loss without
ever holding `(B, T, V)` logits. See `shared/spec/objectives.md` for the mathematics.

    >>> import torch
    >>> from hpd.objectives import get_objective, OBJECTIVES
    >>> sorted(OBJECTIVES)
    ['abkl', 'akl', 'fkl', 'hpd', 'jsd', 'orkl', 'rkl', 'sft', 'skl', 'srkl', 'todi', 'tvd']
    >>> obj = get_objective("skl", alpha=0.2)
    >>> out = obj(torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    >>> out.loss.backward()
"""

from __future__ import annotations

from hpd.errors import HPDError
from hpd.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput, Param, TeacherChunk, TokenWeights, reduce_metrics
from hpd.objectives.divergences import (
    AdaptiveKL, AlphaBetaDivergence, ForwardKL, JensenShannon, ReverseKL, SkewForwardKL, SkewReverseKL, TokenwiseDivergence, TotalVariation,
)
from hpd.objectives.sampled import SFT, HybridPolicy, OnPolicyReverseKL
from hpd.objectives.surrogate import (
    DEFAULT_CHUNK_SIZE, GatheredTeacher, HeadTeacher, LogitsTeacher, TeacherView, TopKTeacher, as_teacher_view,
    chunked_objective_loss, objective_loss, resolve_shared_vocab,
)

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        SFT, ForwardKL, ReverseKL, JensenShannon, SkewForwardKL, SkewReverseKL, TotalVariation, AdaptiveKL,
        TokenwiseDivergence, AlphaBetaDivergence, OnPolicyReverseKL, HybridPolicy,
    )
}


def get_objective(name: str, **params: float) -> Objective:
    """The objective `name` with its parameters; a `ValueError` (HPDError) lists what is allowed."""
    cls = OBJECTIVES.get(name)
    if cls is None:
        raise HPDError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    return cls(**params)


def describe_objectives() -> str:
    """One line per objective: name, parameters with ranges, summary."""
    lines = []
    for name, cls in OBJECTIVES.items():
        ps = ", ".join(f"{k}={p.default:g} {p.describe()}" for k, p in cls.params.items())
        lines.append(f"{name:5s} {('(' + ps + ') ') if ps else ''}{cls.summary}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_CHUNK_SIZE", "GatheredTeacher", "HeadTeacher", "IGNORE_INDEX", "LogitsTeacher", "TeacherView", "as_teacher_view", "OBJECTIVES", "Objective", "ObjectiveOutput",
    "Param", "TeacherChunk", "TokenWeights", "TopKTeacher", "chunked_objective_loss", "describe_objectives", "get_objective",
    "objective_loss", "reduce_metrics", "resolve_shared_vocab",
]
