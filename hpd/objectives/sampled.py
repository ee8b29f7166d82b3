"""Objectives on one or two tokens per position: SFT, on-policy sampled reverse KL, and HPD.

They read the teacher only at the sequence token `y` (and, for HPD, at one fresh student sample
`y_hat`), so a caller may hand them teacher log-probabilities gathered at those tokens instead of
a vocabulary-sized tensor.

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpd._lazy import lazy_module
from hpd.objectives.base import Objective, TeacherChunk, TokenWeights

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_module("torch", globals())  # imported on first use: the registry and the config stay torch-free


def _at(logq: Tensor, tokens: Tensor) -> Tensor:
    return logq.gather(1, tokens[:, None]).squeeze(1)


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
        r = s.exp() * (t - s)
        r_hat = s_hat.exp() * (t_hat - s_hat)
        A = r > 0
        B = r_hat < 0
        differs = sample != labels
        p_y = t.exp()
        w_y = r + A * p_y + (A & B) * p_y
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
        return TokenWeights(
            weights=torch.stack([w_y, w_hat], 1),
            tokens=torch.stack([labels, sample], 1),
            # The reverse KL at each position, estimated from the student's own sample.
            value=s_hat - t_hat,
            stats=stats,
        )
