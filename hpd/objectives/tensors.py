"""The tensor-level pieces that objectives and the loss routine (`hpd.objectives.surrogate`) share:
the label conventions, the per-chunk teacher view (`TeacherChunk`), the per-chunk result
(`TokenWeights`), the user-facing result (`ObjectiveOutput`) and the float32 helpers. Kept apart
from `hpd.objectives.base` (the `Objective` class, whose calls enter the surrogate) so that the
surrogate needs nothing from the module that calls it.

    >>> import torch
    >>> from hpd.objectives.tensors import kl
    >>> p = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]]), -1)
    >>> kl(p, p).tolist()
    [0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hpd._lazy import lazy_module
from hpd.errors import HPDError

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_module("torch", globals())  # imported on first use: the registry and the config stay torch-free

IGNORE_INDEX = -100


def shift_labels(labels: Tensor) -> Tensor:
    """Hugging Face labels `(B, T)` (`labels[:, t] = input_ids[:, t]`, -100 ignored) aligned with the logits.

    Returns `(B, T)` with `out[:, t] = labels[:, t + 1]` and -100 in the last column: position t's
    logits predict token t + 1, and the last position predicts nothing in the batch. This is the
    shift HF's own causal-LM loss does inside the model; hpd's objectives take aligned labels.
    """
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def refuse_unshifted_labels(labels: Tensor) -> None:
    """Refuse labels `(B, T)` that look unshifted (Hugging Face's convention) where aligned ones are expected.

    Aligned labels of a batch of whole sequences never label a row's last position (nothing
    follows it), while HF labels of prompt + completion rows label it in the longest row, and
    ignore every row's first position (a prompt token). That pattern (every first position
    ignored, some last position labeled) is refused; labels with an active first position
    (random labels, pretraining windows) pass. The check reads one boolean from the device.
    """
    if labels.dim() != 2 or labels.shape[1] < 2:
        return
    suspicious = (labels[:, 0] == IGNORE_INDEX).all() & (labels[:, -1] != IGNORE_INDEX).any()
    if bool(suspicious):
        raise HPDError(
            "labels look unshifted (Hugging Face's convention, labels[:, t] = input_ids[:, t]): every row ignores its "
            "first position and some row labels its last one, which labels aligned with the logits (labels[:, t] = "
            "the token logits[:, t] predict) never do. Shift them with hpd.objectives.shift_labels(labels), or use "
            "hpd.integrations (HPDLoss, DistillationTrainer), which take HF labels; if they are aligned (a window cut "
            "from longer sequences), pass check_alignment=False"
        )



class TeacherChunk:
    """The teacher's log-probabilities at C active positions: full `(C, V)`, sparse `(C, K)`, or top-K.

    Sparse teachers hold log-probabilities only at some tokens (`tokens (C, K)`), which is all a
    one-hot objective needs; asking a sparse teacher for a token it does not hold is an error.

    A top-K teacher (from a teacher cache) is sparse with, in addition, `tail (C,)`: the log of
    the teacher's mass outside its top-K tokens, which are the last `num_topk` columns of
    `tokens` (earlier columns hold exact values at other tokens, e.g. the sequence token). A token
    it does not hold gets the tail mass spread evenly over the `vocab_size - num_topk` tokens
    outside the top-K, and full-vocabulary objectives see it as K + 1 categories (`buckets`).
    """

    # A partial teacher cannot score every token: `at` gives NaN there (across tokenizers, a student
    # token whose text is no single teacher token); objectives then leave that term out.
    partial = False

    def __init__(self, logp: Tensor, tokens: Tensor | None = None, *, tail: Tensor | None = None, num_topk: int = 0,
                 vocab_size: int | None = None):
        self.logp = logp  # (C, V) when tokens is None, else (C, K)
        self.tokens = tokens  # (C, K) or None
        self.tail = tail  # (C,) log teacher mass outside the top-K, or None
        self.num_topk = num_topk
        self.vocab_size = vocab_size
        if tail is not None and (tokens is None or not 0 < num_topk <= tokens.shape[1] or vocab_size is None
                                 or num_topk >= vocab_size):
            raise HPDError("a top-K teacher chunk needs tokens, 0 < num_topk <= their columns, and num_topk < vocab_size")

    @property
    def is_full(self) -> bool:
        return self.tokens is None

    @property
    def is_topk(self) -> bool:
        return self.tail is not None

    def full(self, objective: str) -> Tensor:
        """Teacher log-probabilities over the whole vocabulary, `(C, V)`."""
        if self.tokens is not None:
            raise HPDError(
                f"objective '{objective}' needs the teacher's full distribution, but the teacher was given as "
                "log-probabilities gathered at a few tokens; pass teacher logits (B, T, V), a HeadTeacher, or a "
                "teacher cache with top-K log-probabilities (hpd cache-teacher --top-k K)"
            )
        return self.logp

    def sorted_logp(self, objective: str) -> Tensor:
        """The teacher's log-probabilities over its own vocabulary in decreasing order, `(C, V_t)`:
        for objectives that compare distributions without matching tokens (`uld`). A top-K teacher
        gives its top-K and its tail mass spread evenly over the other `V - K` tokens."""
        if self.is_topk:
            K, V = self.num_topk, self.vocab_size
            rest = (upcast(self.tail) - math.log(V - K))[:, None].expand(-1, V - K)
            return torch.cat([upcast(self.logp[:, -K:]), rest], 1).sort(-1, descending=True).values
        return self.full(objective).sort(-1, descending=True).values

    def buckets(self, objective: str) -> tuple[Tensor, Tensor]:
        """The teacher as K + 1 categories: top-K ids `(C, K)` and log-probabilities `(C, K + 1)`.

        The last category is the tail bucket (every token outside the top-K). The log-probabilities
        are renormalized, so low-precision storage still gives a distribution.
        """
        if self.tail is None:
            self.full(objective)  # raises, saying what is missing
        K = self.num_topk
        logp = torch.cat([upcast(self.logp[:, -K:]), upcast(self.tail)[:, None]], 1)
        return self.tokens[:, -K:], torch.log_softmax(logp, -1)

    def top(self, k: int, objective: str) -> tuple[Tensor, Tensor]:
        """The teacher's `k` most probable tokens, most probable first: ids and log-probabilities, each `(C, k')`.

        `k' = min(k, V)` for a full teacher; a top-K teacher gives the first `min(k, num_topk)` of
        its top-K (as stored). A teacher gathered at a few tokens cannot say which tokens they are.
        """
        if self.is_full:
            logp, ids = self.logp, None
        elif self.is_topk:
            logp, ids = self.logp[:, -self.num_topk:], self.tokens[:, -self.num_topk:]
        else:
            raise HPDError(
                f"objective '{objective}' reads the teacher's {k} most probable tokens, but the teacher was given as "
                "log-probabilities gathered at a few tokens; pass teacher logits (B, T, V), a HeadTeacher, or a teacher "
                "cache built with top-K log-probabilities (hpd cache-teacher --top-k K)"
            )
        values, idx = logp.topk(min(k, logp.shape[1]), 1)
        return (idx if ids is None else ids.gather(1, idx)), values

    def with_exact(self, tokens: Tensor, logp: Tensor) -> TeacherChunk:
        """This chunk with the exact log-probabilities `logp (C,)` of `tokens (C,)` as a first column
        (read before the top-K and the tail: exact values come first)."""
        return TeacherChunk(torch.cat([logp.to(self.logp.dtype)[:, None], self.logp], 1),
                            torch.cat([tokens[:, None], self.tokens], 1), tail=self.tail, num_topk=self.num_topk,
                            vocab_size=self.vocab_size)

    def outside_topk(self, tokens: Tensor) -> Tensor:
        """`(C,)` bool: `tokens (C,)` is not among the teacher's top-K (top-K teachers only)."""
        return ~(self.tokens[:, -self.num_topk:] == tokens[:, None]).any(1)

    def at(self, tokens: Tensor) -> Tensor:
        """Teacher log-probabilities of `tokens (C,)`, as `(C,)`."""
        if self.tokens is None:
            return self.logp.gather(1, tokens[:, None]).squeeze(1)
        hit = self.tokens == tokens[:, None]  # (C, K)
        found = hit.any(1)
        # The first column holding the token: exact values come before approximate top-K ones.
        value = self.logp.gather(1, hit.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)
        if self.tail is None:
            if not bool(found.all()):
                raise HPDError(
                    "the teacher's log-probabilities were gathered at other tokens than the objective needs: "
                    "gather them at the labels (and, for hpd, at sampled_tokens too)"
                )
            return value
        # Outside the top-K: the tail mass spread evenly over the tokens it holds.
        estimate = self.tail - math.log(self.vocab_size - self.num_topk)
        return torch.where(found, value, estimate.to(value.dtype))


@dataclass
class TeacherParts:
    """The teacher at C positions given in parts, each by a teacher of its own (a teacher per row,
    `hpd.teachers.routing`): the objective weighs each part with its own teacher, exactly as that
    teacher alone would, and `merge_weights` puts the parts' weights back in position order.

    parts: `(rows (C_i,) long, the part's TeacherChunk, its positions (C_i,) in its own teacher's
    view, that view)` for disjoint `rows` covering 0..C-1.
    """

    parts: list


def merge_weights(parts: list[tuple[Tensor, TokenWeights]], C: int, V: int, labels: Tensor) -> TokenWeights:
    """One `TokenWeights` of C positions from those of disjoint row sets `(rows (C_i,), weights)`.

    Vocabulary weights `(C_i, V)` stay so; when every part weighs a few tokens `(C_i, K_i)`, the
    narrower parts are padded to the widest with zero weights at the sequence token `labels (C,)`
    (a zero weight adds nothing to the surrogate or its gradient); a mix of both becomes `(C, V)`.
    """
    ref = parts[0][1].weights
    value = torch.empty(C, dtype=parts[0][1].value.dtype, device=ref.device)
    for rows, tw in parts:
        value[rows] = tw.value
    if all(tw.tokens is not None for _, tw in parts):
        K = max(tw.tokens.shape[1] for _, tw in parts)
        weights = torch.zeros(C, K, dtype=ref.dtype, device=ref.device)
        tokens = labels[:, None].expand(C, K).clone()
        for rows, tw in parts:
            k = tw.tokens.shape[1]
            weights[rows, :k], tokens[rows, :k] = tw.weights.to(ref.dtype), tw.tokens
        return TokenWeights(weights, tokens, value)
    weights = torch.zeros(C, V, dtype=ref.dtype, device=ref.device)
    for rows, tw in parts:
        if tw.tokens is None:
            weights[rows] = tw.weights.to(ref.dtype)
        else:  # a sparse part among vocabulary ones: its weights added at its tokens
            weights[rows] = weights[rows].scatter_add(1, tw.tokens, tw.weights.to(ref.dtype))
    return TokenWeights(weights, None, value)


def bucket_logq(logq: Tensor, ids: Tensor) -> Tensor:
    """The student as K + 1 categories: `logq (C, V)` at `ids (C, K)` plus the rest, `(C, K + 1)`."""
    tail = logq.scatter(1, ids, float("-inf")).logsumexp(-1)
    return torch.cat([logq.gather(1, ids), tail[:, None]], 1)


def unbucket_weights(w_b: Tensor, logq: Tensor, ids: Tensor, logq_b: Tensor) -> Tensor:
    """Vocabulary weights `(C, V)` from weights over K + 1 categories `w_b (C, K + 1)`.

    A top-K token keeps its weight; the tail bucket's weight is shared in proportion to the
    student, `w_v = w_tail q_v / q_tail`, which gives `-sum_v w_v log q_v` exactly the gradient of
    `-w_tail log q_tail` (since `d log q_tail = sum_{v in tail} (q_v / q_tail) d log q_v`).
    """
    w = torch.exp(logq - logq_b[:, -1:]) * w_b[:, -1:]
    return w.scatter_(1, ids, w_b[:, :-1])


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

    def mixed_with_ce(self, labels: Tensor, ce: Tensor, ce_weight: float, kd_weight: float) -> TokenWeights:
        """`ce_weight * CE(y) + kd_weight * (these weights)`: weights `ce_weight [v = y] + kd_weight w(v)`.

        labels: `(C,)` the sequence tokens `y`; ce: `(C,)` their cross-entropy `-log q(y)`.
        With `kd_weight = 0` the objective's weights are dropped, not multiplied by 0 (an infinite
        weight would give NaN), so `ce_weight = 1, kd_weight = 0` is exactly `sft`.
        """
        ce_col = torch.full_like(ce, ce_weight)[:, None]  # (C, 1)
        if kd_weight == 0.0:
            return TokenWeights(weights=ce_col, tokens=labels[:, None], value=ce_weight * ce, stats=self.stats)
        value = kd_weight * self.value + ce_weight * ce if ce_weight else kd_weight * self.value
        w = self.weights * kd_weight
        tokens = self.tokens
        if ce_weight:
            if tokens is None:  # vocabulary weights: add ce_weight at y
                w = w.scatter_add_(1, labels[:, None], ce_col.to(w.dtype))
            else:  # a sparse token set: y as one more column (a repeated token adds up in the surrogate)
                w, tokens = torch.cat([ce_col.to(w.dtype), w], 1), torch.cat([labels[:, None], tokens], 1)
        return TokenWeights(weights=w, tokens=tokens, value=value, stats=self.stats)


@dataclass
class ObjectiveOutput:
    """The result of an objective over a batch.

    loss:       `()` the differentiable surrogate `-(1/N) sum sg(w) log q`.
    value:      `()` the objective's own value (detached), normalized like the loss; for a mixed
                objective `ce_weight * CE + kd_weight * D`.
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
