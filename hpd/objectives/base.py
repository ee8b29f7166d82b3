"""The building blocks of the unified token-weighted view of distillation.

Every objective of `hpd` (see `docs/objectives.md`) has a gradient of the form

    grad L = -(1/N) sum_t sum_{v in S_t} w_t(v) grad log q(v | x<t)

so an objective is nothing but a rule that, at a chunk of active positions, turns the student's
and the teacher's log-probabilities into detached token weights `w` over a token set `S_t`
(`{y}`, `{y, y_hat}` or the whole vocabulary) plus its own per-position value for logging. The
one routine in `hpd.objectives.surrogate` turns those weights into the loss.

This module holds what objectives and that routine share: the parameter declarations, the
per-chunk teacher view, the per-chunk result (`TokenWeights`), the user-facing result
(`ObjectiveOutput`) and the `Objective` base class.

    >>> import torch
    >>> from hpd.objectives import get_objective
    >>> obj = get_objective("fkl")
    >>> s = torch.randn(1, 3, 7, requires_grad=True)
    >>> out = obj(s, torch.randn(1, 3, 7), torch.tensor([[1, -100, 4]]))
    >>> round(out.metrics["agreement"], 2) in (0.0, 0.5, 1.0)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from hpd.errors import HPDError

if TYPE_CHECKING:  # annotations only: the registry and the config stay torch-free
    from torch import Tensor

from hpd.objectives.tensors import (  # noqa: F401 (re-exported: their historical home)
    IGNORE_INDEX, ObjectiveOutput, TeacherChunk, TokenWeights, bucket_logq, kl, reduce_metrics, refuse_unshifted_labels,
    shift_labels, unbucket_weights, upcast, xlogx_ratio,
)


Support = Literal["token", "pair", "vocab"]


@dataclass(frozen=True)
class Param:
    """A scalar parameter of an objective, with its allowed interval: the one declaration of it.

    The config's `objective` section gets one field per parameter from these (`hpd.config`), with
    this default, range and help; `key` names that field when it is not the parameter's own name
    (e.g. ToDi's `beta` is `objective.todi_beta`, as jsd's `beta` is `objective.beta`).
    Objectives that declare the same field must declare the same default and range.
    `integer` parameters (a count, e.g. hpdk's `topk`) take whole numbers only (an `int` config field).
    """

    default: float
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    key: str | None = None
    integer: bool = False

    def field_name(self, name: str) -> str:
        """The config field (under `objective.`) that holds this parameter, declared as `name`."""
        return self.key or name

    def same_range(self, other: Param) -> bool:
        return (self.default, self.low, self.high, self.low_open, self.high_open, self.integer) == (
            other.default, other.low, other.high, other.low_open, other.high_open, other.integer)

    def describe(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def check(self, objective: str, name: str, value: float) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise HPDError(f"objective '{objective}': {name} must be a number in {self.describe()}, got {value!r}") from None
        ok = math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise HPDError(f"objective '{objective}': {name}={value:g} is out of range; allowed: {self.describe()} ({self.help})")
        if self.integer and value != int(value):
            raise HPDError(f"objective '{objective}': {name}={value:g} must be a whole number in {self.describe()} ({self.help})")
        return value


TEMPERATURE = Param(1.0, "Loss temperature tau: both distributions are softmax(logits / tau). Distinct from "
                         "regime.temperature (rollout sampling).", low=0.0, low_open=True)
# Every objective's loss is ce_weight * CE(y) + kd_weight * (the objective); the defaults give the
# pure objective. Classic KD and the AKL/ToDi authors' recipes train CE + 0.1 * divergence.
CE_WEIGHT = Param(0.0, "Weight of the cross-entropy on the data token: loss = ce_weight * CE + kd_weight * objective "
                       "(AKL/ToDi as their authors run them: ce_weight=1, kd_weight=0.1).", low=0.0)
KD_WEIGHT = Param(1.0, "Weight of the objective itself in that sum (at least one of the two > 0).", low=0.0)
COMMON_PARAMS = {"temperature": TEMPERATURE, "ce_weight": CE_WEIGHT, "kd_weight": KD_WEIGHT}


class Objective:
    """Base class: subclasses declare `name`, `support`, `params` and implement `weights`.

    Calling an objective runs the unchunked reference path; `.chunked(...)` runs the memory-lean
    path from hidden states and the LM head. Both share `weights` and give the same loss and
    gradients.

    Every objective also takes `temperature`, `ce_weight` and `kd_weight` (defaults 1, 0, 1): the
    loss is `ce_weight * CE(y) + kd_weight * D`, e.g. `get_objective("akl", ce_weight=1, kd_weight=0.1)`.
    """

    name: ClassVar[str]
    support: ClassVar[Support]
    params: ClassVar[dict[str, Param]] = {}
    needs_teacher: ClassVar[bool] = True
    extremes: ClassVar[tuple[str, ...]] = ()  # statistics also reported as min/max
    summary: ClassVar[str] = ""

    def __init__(self, **params: float):
        allowed = {**self.params, **COMMON_PARAMS}
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            listed = ", ".join(f"{k} in {p.describe()}" for k, p in allowed.items())
            raise HPDError(f"objective '{self.name}' has no parameter {', '.join(unknown)}; its parameters: {listed}")
        for key, spec in allowed.items():
            setattr(self, key, spec.check(self.name, key, params.get(key, spec.default)))
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise HPDError(f"objective '{self.name}': ce_weight and kd_weight are both 0, so the loss is 0; "
                           "set at least one > 0 (e.g. ce_weight=1, kd_weight=0.1)")

    @property
    def mixed(self) -> bool:
        """Whether the loss adds cross-entropy or scales the objective (not the pure objective)."""
        return (self.ce_weight, self.kd_weight) != (CE_WEIGHT.default, KD_WEIGHT.default)

    def __repr__(self) -> str:
        keys = [*self.params, "temperature", *(("ce_weight", "kd_weight") if self.mixed else ())]
        args = ", ".join(f"{k}={getattr(self, k):g}" for k in keys)
        return f"{type(self).__name__}({args})"

    def weights(self, logq: Tensor, teacher: TeacherChunk | None, labels: Tensor, sample: Tensor | None) -> TokenWeights:
        """Token weights at C active positions.

        logq:    `(C, V)` student log-probabilities (detached, float32).
        teacher: the teacher's log-probabilities at those positions (None only if not needed).
        labels:  `(C,)` the sequence tokens `y`.
        sample:  `(C,)` the student samples `y_hat` (only for `support == "pair"`).
        """
        raise NotImplementedError

    def __call__(self, student_logits: Tensor, teacher, labels: Tensor, **kwargs) -> ObjectiveOutput:
        """The unchunked reference path: see `hpd.objectives.surrogate.objective_loss`."""
        from hpd.objectives.surrogate import objective_loss

        return objective_loss(self, student_logits, teacher, labels, **kwargs)

    def chunked(self, hidden: Tensor, lm_head_weight, teacher, labels: Tensor, **kwargs) -> ObjectiveOutput:
        """The memory-lean path: see `hpd.objectives.surrogate.chunked_objective_loss`."""
        from hpd.objectives.surrogate import chunked_objective_loss

        return chunked_objective_loss(self, hidden, lm_head_weight, teacher, labels, **kwargs)
