"""The building blocks of the unified token-weighted view of distillation.

Every objective of `hpd` (see `shared/spec/objectives.md`) has a gradient of the form

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
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from hpd.errors import HPDError

IGNORE_INDEX = -100

Support = Literal["token", "pair", "vocab"]


@dataclass(frozen=True)
class Param:
    """A scalar parameter of an objective, with its allowed interval."""

    default: float
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

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
        return value


TEMPERATURE = Param(1.0, "loss temperature: both distributions are softmax(logits / temperature)", low=0.0, low_open=True)


class TeacherChunk:
    """The teacher's log-probabilities at C active positions: full `(C, V)` or sparse `(C, K)`.

    Sparse teachers hold log-probabilities only at some tokens (`tokens (C, K)`), which is all a
    one-hot objective needs; asking a sparse teacher for a token it does not hold is an error.
    """

    def __init__(self, logp: Tensor, tokens: Tensor | None = None):
        self.logp = logp  # (C, V) when tokens is None, else (C, K)
        self.tokens = tokens  # (C, K) or None

    @property
    def is_full(self) -> bool:
        return self.tokens is None

    def full(self, objective: str) -> Tensor:
        """Teacher log-probabilities over the whole vocabulary, `(C, V)`."""
        if self.tokens is not None:
            raise HPDError(
                f"objective '{objective}' needs the teacher's full distribution, but the teacher was given as "
                "log-probabilities gathered at a few tokens; pass teacher logits (B, T, V) or a HeadTeacher"
            )
        return self.logp

    def at(self, tokens: Tensor) -> Tensor:
        """Teacher log-probabilities of `tokens (C,)`, as `(C,)`."""
        if self.tokens is None:
            return self.logp.gather(1, tokens[:, None]).squeeze(1)
        hit = self.tokens == tokens[:, None]  # (C, K)
        if not bool(hit.any(1).all()):
            raise HPDError(
                "the teacher's log-probabilities were gathered at other tokens than the objective needs: "
                "gather them at the labels (and, for hpd, at sampled_tokens too)"
            )
        return (self.logp * hit).sum(1) / hit.sum(1)


@dataclass
class TokenWeights:
    """What an objective computes at C active positions (all detached, float32).

    weights: `(C, K)` over `tokens` for sparse token sets, `(C, V)` over the vocabulary otherwise.
    tokens:  `(C, K)` token ids, or None for the whole vocabulary.
    value:   `(C,)` the objective's own per-position value (a divergence or its estimate).
    stats:   name -> `(C,)` per-position quantities to report; NaN marks a position not counted.
    """

    weights: Tensor
    tokens: Tensor | None
    value: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ObjectiveOutput:
    """The result of an objective over a batch.

    loss:       `()` the differentiable surrogate `-(1/N) sum sg(w) log q`.
    value:      `()` the objective's own value (detached), normalized like the loss.
    num_active: `()` number of active positions in this batch (int64).
    sums/counts/mins/maxs: per-statistic reductions kept as tensors, so reading them costs no host
        sync until `.metrics` is asked for.
    """

    loss: Tensor
    value: Tensor
    num_active: Tensor
    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, Tensor] = field(default_factory=dict)
    mins: dict[str, Tensor] = field(default_factory=dict)
    maxs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """Token means of every statistic (and `_min`/`_max` where the objective reports extremes)."""
        return reduce_metrics([self])


def reduce_metrics(outputs: list[ObjectiveOutput]) -> dict[str, float]:
    """Combine the statistics of several outputs (micro-batches of one step) into floats.

    Means are weighted by how many positions each output counted, so micro-batching does not
    change them; a statistic no position counted is NaN.
    """
    out: dict[str, float] = {}
    names = dict.fromkeys(n for o in outputs for n in o.sums)
    for name in names:
        s = sum(float(o.sums[name]) for o in outputs if name in o.sums)
        c = sum(float(o.counts[name]) for o in outputs if name in o.counts)
        extreme = any(name in o.mins for o in outputs)
        key = f"{name}_mean" if extreme else name
        out[key] = s / c if c > 0 else float("nan")
        if extreme:
            mins = [float(o.mins[name]) for o in outputs if name in o.mins and float(o.counts[name]) > 0]
            maxs = [float(o.maxs[name]) for o in outputs if name in o.maxs and float(o.counts[name]) > 0]
            out[f"{name}_min"] = min(mins) if mins else float("nan")
            out[f"{name}_max"] = max(maxs) if maxs else float("nan")
    return out


def upcast(x: Tensor) -> Tensor:
    """`x` in at least float32 (losses are computed in float32, or float64 when given float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def xlogx_ratio(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """`a * (log a - log b)` elementwise with `0 log 0 = 0`; inputs are log-probabilities."""
    a = logp_a.exp()
    return torch.where(a > 0, a * (logp_a - logp_b), torch.zeros_like(a))


def kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """`KL(a || b)` per row of `(C, V)` log-probabilities, as `(C,)`."""
    return xlogx_ratio(logp_a, logp_b).sum(-1)


class Objective:
    """Base class: subclasses declare `name`, `support`, `params` and implement `weights`.

    Calling an objective runs the unchunked reference path; `.chunked(...)` runs the memory-lean
    path from hidden states and the LM head. Both share `weights` and give the same loss and
    gradients.
    """

    name: ClassVar[str]
    support: ClassVar[Support]
    params: ClassVar[dict[str, Param]] = {}
    needs_teacher: ClassVar[bool] = True
    extremes: ClassVar[tuple[str, ...]] = ()  # statistics also reported as min/max
    summary: ClassVar[str] = ""

    def __init__(self, **params: float):
        allowed = {**self.params, "temperature": TEMPERATURE}
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            listed = ", ".join(f"{k} in {p.describe()}" for k, p in allowed.items())
            raise HPDError(f"objective '{self.name}' has no parameter {', '.join(unknown)}; its parameters: {listed}")
        for key, spec in allowed.items():
            setattr(self, key, spec.check(self.name, key, params.get(key, spec.default)))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k):g}" for k in [*self.params, "temperature"])
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

    def chunked(self, hidden: Tensor, lm_head_weight: Tensor, teacher, labels: Tensor, **kwargs) -> ObjectiveOutput:
        """The memory-lean path: see `hpd.objectives.surrogate.chunked_objective_loss`."""
        from hpd.objectives.surrogate import chunked_objective_loss

        return chunked_objective_loss(self, hidden, lm_head_weight, teacher, labels, **kwargs)
