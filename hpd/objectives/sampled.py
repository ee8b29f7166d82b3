"""Objectives on a few tokens per position: SFT, on-policy sampled reverse KL, HPD, and HPD-top-k.

SFT, orkl and HPD read the teacher only at the sequence token `y` (and, for HPD, at one fresh
student sample `y_hat`), so a caller may hand them teacher log-probabilities gathered at those
tokens instead of a vocabulary-sized tensor. `hpdk` (HPD's tokens plus the teacher's top-k, an
extension beyond the paper: see `HybridPolicyTopK`) also needs to know which tokens the teacher
ranks first: teacher logits, a `HeadTeacher`, or a teacher cache with top-K.

HPD (Hybrid Policy Distillation), per active position, with `s = log q(y)`, `t = log p(y)`,
`r = q(y)(t - s)` and the same at the sample (`s^`, `t^`, `r^`):

    A = [r > 0]            B = [r^ < 0]
    w(y)     = r + A p(y) + (A and B) p(y)
    w(y_hat) = B [y_hat != y] r^

    >>> import torch
    >>> from hpd.objectives import get_objective
    >>> s = torch.randn(1, 4, 6, requires_grad=True); t = torch.randn(1, 4, 6)
    >>> y = torch.tensor([[0, 1, 2, 3]]); y_hat = torch.tensor([[0, 5, 2, 1]])
    >>> out = get_objective("hpd")(s, t, y, sampled_tokens=y_hat)
    >>> sorted(k for k in out.metrics if k.startswith("frac"))
    ['frac_A', 'frac_A_and_B', 'frac_B', 'frac_sample_differs']
    >>> out = get_objective("hpdk", topk=2)(s, t, y, sampled_tokens=y_hat)
    >>> sorted(k for k in out.metrics if k not in get_objective("hpd")(s, t, y, sampled_tokens=y_hat).metrics)
    ['frac_teacher_top1_is_y', 'topk_push']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpd._lazy import lazy_module
from hpd.objectives.base import Objective, Param, TeacherChunk, TokenWeights

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_module("torch", globals())  # imported on first use: the registry and the config stay torch-free


def _at(logq: Tensor, tokens: Tensor) -> Tensor:
    return logq.gather(1, tokens[:, None]).squeeze(1)


def _covering(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """HPD's rule for a token the student should cover, from `s = log q(v)`, `t = log p(v)` (any shape).

    Returns `r = q(v) (t - s)` (the exact reverse-KL weight of `v`), `A = [r > 0]` (the student
    under-covers `v`) and the weight `r + A p(v)` (plus the forward-KL covering push where `A`).
    """
    r = s.exp() * (t - s)
    A = r > 0
    return r, A, r + A * t.exp()


class SFT(Objective):
    name = "sft"
    summary = "cross-entropy on the sequence token (sequence-level KD on teacher data)"
    support = "token"
    needs_teacher = False

    def weights(self, logq, teacher, labels, sample):
        s = _at(logq, labels)
        return TokenWeights(weights=torch.ones_like(s)[:, None], tokens=labels[:, None], value=-s)


class OnPolicyReverseKL(Objective):
    name = "orkl"
    summary = "on-policy sampled reverse KL: weight log p(y) - log q(y) on student-sampled y"
    support = "token"

    def weights(self, logq, teacher: TeacherChunk, labels, sample):
        s, t = _at(logq, labels), teacher.at(labels)
        return TokenWeights(weights=(t - s)[:, None], tokens=labels[:, None], value=s - t)


class HybridPolicy(Objective):
    name = "hpd"
    summary = "Hybrid Policy Distillation: covering push where q under-covers y, one-sample reverse-KL fix"
    support = "pair"
    extremes = ("r", "r_hat")

    def weights(self, logq, teacher: TeacherChunk, labels, sample):
        s, t = _at(logq, labels), teacher.at(labels)
        s_hat, t_hat = _at(logq, sample), teacher.at(sample)
        if teacher.partial:  # a sample the teacher cannot score (across tokenizers): its term is left out
            unscored = t_hat.isnan()
            t_hat = torch.where(unscored, s_hat, t_hat)  # r_hat = 0: B false, no sample weight
        r, A, w_cover = _covering(s, t)
        r_hat = s_hat.exp() * (t_hat - s_hat)
        B = r_hat < 0
        differs = sample != labels
        w_y = w_cover + (A & B) * t.exp()  # the covering push doubled where the student also over-produces y_hat
        w_hat = (B & differs) * r_hat
        nan = torch.full_like(r_hat, float("nan"))
        stats = {
            "frac_A": A.float(),
            "frac_B": B.float(),
            "frac_sample_differs": differs.float(),
            "frac_A_and_B": (A & B).float(),
            "r": r,
            "r_hat": torch.where(differs, r_hat, nan),
        }
        if teacher.partial:
            stats["frac_sample_unscored"] = unscored.to(r.dtype)
        return TokenWeights(
            weights=torch.stack([w_y, w_hat], 1),
            tokens=torch.stack([labels, sample], 1),
            # The reverse KL at each position, estimated from the student's own sample.
            value=s_hat - t_hat,
            stats=stats,
        )


class HybridPolicyTopK(HybridPolicy):
    """HPD plus the teacher's top-k tokens (`hpdk`): an extension beyond the paper, HPD's cost kept.

    HPD pushes a data token the teacher rejects down (`w(y) = r < 0`) but has no term that raises
    the token the teacher prefers instead (its sample is only pushed down, `w(y_hat) <= 0`), so
    the mass leaves `y` for every untouched token alike. `hpdk` keeps HPD's weights on `y` and
    `y_hat` unchanged and adds, at each active position, the teacher's `k` most probable tokens
    `K_t` (`topk`, config `objective.hpdk_topk`). Each `v` in `K_t` other than `y` and `y_hat`
    gets HPD's rule for `y` without the doubling term:

        r_v = q(v) (log p(v) - log q(v))     A_v = [r_v > 0]     w(v) = r_v + A_v p(v)

    (its exact reverse-KL weight, plus the forward-KL covering push `p(v)` where the student
    under-covers it). A top-k token equal to `y` or `y_hat` gets weight 0 in its top-k column: it
    already carries HPD's weight. The loss is the usual surrogate over `{y, y_hat} ∪ K_t`; the
    value is HPD's (`log q(y_hat) - log p(y_hat)`). `topk = 0` is `hpd` exactly. The teacher is read
    at `2 + k` tokens per position, with no vocabulary-wide weight; it must say which tokens rank
    first (logits, a `HeadTeacher`, or a cache with top-K; a cache gives its first `min(k, K)`).
    Logged besides HPD's statistics: `frac_teacher_top1_is_y` (the teacher's most probable token
    is `y`) and `topk_push` (the sum of the positive top-k weights per position).
    """

    name = "hpdk"
    summary = "HPD plus the teacher's top-k tokens, each weighted as HPD weighs y (an extension beyond the paper)"
    params = {"topk": Param(8, "how many of the teacher's most probable tokens join HPD's {y, y_hat} at each "
                               "position (0 = hpd)", low=0.0, key="hpdk_topk", integer=True)}

    def weights(self, logq, teacher: TeacherChunk, labels, sample):
        """HPD's weights and tokens `(C, 2)` (`y`, `y_hat`) followed by the top-k columns: `(C, 2 + k')`,
        `k' = min(k, what the teacher holds)`."""
        tw = super().weights(logq, teacher, labels, sample)
        k = int(self.topk)
        if k == 0:
            return tw
        ids, t_k = teacher.top(k, self.name)  # (C, k')
        _, _, w_k = _covering(logq.gather(1, ids), t_k)
        fresh = (ids != labels[:, None]) & (ids != sample[:, None])  # y and y_hat carry HPD's weights already
        w_k = torch.where(fresh, w_k, torch.zeros_like(w_k))
        tw.stats["frac_teacher_top1_is_y"] = (ids[:, 0] == labels).to(logq.dtype)
        tw.stats["topk_push"] = w_k.clamp_min(0).sum(1)
        return TokenWeights(weights=torch.cat([tw.weights, w_k], 1), tokens=torch.cat([tw.tokens, ids], 1),
                            value=tw.value, stats=tw.stats)
