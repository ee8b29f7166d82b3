"""Full-vocabulary objectives: forward/reverse KL, JSD, skew KLs, TVD, AKL, ToDi and ABKL.

Each one reads the teacher's whole distribution `p` and the student's `q` at a chunk of positions
and returns its divergence per position and detached weights `w(v) = -q(v) dD/dq(v)` over the
vocabulary (the identity of `docs/objectives.md`), so that the shared surrogate
`-(1/N) sum_v sg(w(v)) log q(v)` has exactly the gradient of the divergence. Weights may differ
from that formula by a per-position multiple of `q(v)`, which changes nothing. With a cached
top-K teacher they work on K + 1 categories (the top-K tokens and one tail bucket).

    >>> import torch
    >>> from hpd.objectives import get_objective
    >>> s = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    >>> out = get_objective("jsd", beta=0.5)(s, torch.randn(2, 4, 9), torch.zeros(2, 4, dtype=torch.long))
    >>> out.loss.backward(); s.grad.shape
    torch.Size([2, 4, 9])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from hpd._lazy import lazy_module
from hpd.objectives.base import (
    Objective, Param, TeacherChunk, TokenWeights, bucket_logq, kl, unbucket_weights, xlogx_ratio,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_module("torch", globals())  # imported on first use: the registry and the config stay torch-free


class _VocabObjective(Objective):
    support = "vocab"

    def weights(self, logq: Tensor, teacher: TeacherChunk | None, labels: Tensor, sample: Tensor | None) -> TokenWeights:
        if teacher.is_topk:
            # A cached top-K teacher: the divergence over K + 1 categories (the top-K tokens and
            # one tail bucket), its tail weight shared back over the vocabulary.
            ids, logp_b = teacher.buckets(self.name)
            logq_b = bucket_logq(logq, ids)
            w_b, value = self.divergence(logq_b, logp_b)
            return TokenWeights(weights=unbucket_weights(w_b, logq, ids, logq_b), tokens=None, value=value)
        w, value = self.divergence(logq, teacher.full(self.name))
        return TokenWeights(weights=w, tokens=None, value=value)

    def divergence(self, logq: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
        """Weights `(C, V)` and value `(C,)` from log-probabilities `logq, logp (C, V)`."""
        raise NotImplementedError


def _fkl(logq: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    return logp.exp(), kl(logp, logq)


def _rkl(logq: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    # -q (log q - log p + 1) minus the per-position multiple -q.
    return -xlogx_ratio(logq, logp), kl(logq, logp)


class ForwardKL(_VocabObjective):
    name = "fkl"
    summary = "forward KL(p || q): mode covering (classic KD)"

    def divergence(self, logq, logp):
        return _fkl(logq, logp)


class ReverseKL(_VocabObjective):
    name = "rkl"
    summary = "reverse KL(q || p): mode seeking"

    def divergence(self, logq, logp):
        return _rkl(logq, logp)


class JensenShannon(_VocabObjective):
    name = "jsd"
    summary = "generalized JSD beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q (GKD)"
    params = {"beta": Param(0.5, "mixture weight of the teacher; 0 = fkl, 1 = rkl", 0.0, 1.0)}

    def divergence(self, logq, logp):
        beta = self.beta
        if beta == 0.0:
            return _fkl(logq, logp)
        if beta == 1.0:
            return _rkl(logq, logp)
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        value = beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)
        return -(1 - beta) * xlogx_ratio(logq, logm), value


class SkewForwardKL(_VocabObjective):
    name = "skl"
    summary = "skew forward KL(p || alpha p + (1-alpha) q) (DistiLLM)"
    params = {"alpha": Param(0.1, "skew: share of the teacher in the mixture", 0.0, 1.0, high_open=True)}

    def divergence(self, logq, logp):
        a = self.alpha
        logm = torch.logaddexp(logp + math.log(a), logq + math.log1p(-a)) if a > 0 else logq
        # D = -sum p log m + const; dD/dq = -(1-a) p / m.
        return (1 - a) * torch.exp(logq + logp - logm), kl(logp, logm)


class SkewReverseKL(_VocabObjective):
    name = "srkl"
    summary = "skew reverse KL(q || (1-alpha) p + alpha q) (DistiLLM)"
    params = {"alpha": Param(0.1, "skew: share of the student in the mixture", 0.0, 1.0, high_open=True)}

    def divergence(self, logq, logp):
        a = self.alpha
        logm = torch.logaddexp(logp + math.log1p(-a), logq + math.log(a)) if a > 0 else logp
        # D = sum q (log q - log m); dD/dq = log(q/m) + 1 - a q / m.
        q = logq.exp()
        w = -q * ((logq - logm) + 1 - a * torch.exp(logq - logm))
        return w, kl(logq, logm)


class TotalVariation(_VocabObjective):
    name = "tvd"
    summary = "total variation distance 1/2 sum |p - q|"

    def divergence(self, logq, logp):
        p, q = logp.exp(), logq.exp()
        return 0.5 * q * torch.sign(p - q), 0.5 * (p - q).abs().sum(-1)


class AdaptiveKL(_VocabObjective):
    name = "akl"
    summary = "adaptive KL: forward KL on the teacher's head, reverse KL on its tail, gated by |p - q|"
    params = {"mu": Param(0.5, "cumulative teacher mass that defines the head", 0.0, 1.0, low_open=True)}

    def divergence(self, logq, logp):
        p, q = logp.exp(), logq.exp()
        p_sorted, order = p.sort(dim=-1, descending=True)
        head_sorted = p_sorted.cumsum(-1) <= self.mu
        head_sorted[:, 0] = True  # the top token is always in the head
        head = torch.zeros_like(head_sorted).scatter_(1, order, head_sorted)
        gap = (p - q).abs()
        total = gap.sum(-1)
        g_head = torch.where(total > 0, (gap * head).sum(-1) / total.clamp_min(1e-30), torch.full_like(total, 0.5))
        g_tail = 1 - g_head
        w_f, fkl = _fkl(logq, logp)
        w_r, rkl = _rkl(logq, logp)
        return g_head[:, None] * w_f + g_tail[:, None] * w_r, g_head * fkl + g_tail * rkl


class TokenwiseDivergence(_VocabObjective):
    name = "todi"
    summary = "ToDi: per-token mix of forward and reverse KL, a(v) = sigmoid(beta log(p/q))"
    params = {"beta": Param(1.0, "sharpness of the per-token gate", 0.0, low_open=True, key="todi_beta")}

    def divergence(self, logq, logp):
        a = torch.sigmoid(self.beta * (logp - logq))
        value = (a * xlogx_ratio(logp, logq) + (1 - a) * xlogx_ratio(logq, logp)).sum(-1)
        # The gate varies per token, so the -(1-a) q term is not a multiple of q and must stay.
        q = logq.exp()
        w = a * logp.exp() + (1 - a) * q * (logp - logq - 1)
        return w, value


class AlphaBetaDivergence(_VocabObjective):
    name = "abkl"
    summary = "alpha-beta divergence (ABKD): alpha=1, beta->0 is fkl; alpha->0, beta=1 is rkl"
    params = {
        "alpha": Param(1.0, "alpha-beta divergence alpha (any real; 0 is the continuous limit; alpha=1 with "
                            "beta=0 is forward KL, alpha=0 with beta=1 reverse KL)", key="abkl_alpha"),
        "beta": Param(1.0, "alpha-beta divergence beta (any real; 0 is the continuous limit; alpha = beta = 1 "
                           "is 1/2 sum (p - q)^2)", key="abkl_beta"),
    }

    def divergence(self, logq, logp):
        a, b = self.alpha, self.beta
        d = logp - logq  # log(p / q)
        # D = -1/(a b) sum (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)) and its limits, each written
        # as q^c times a function of d that is exactly 0 at d = 0 (expm1 keeps it precise near there
        # and near the limits). The weight -q dD/dq = q^b (p^a - q^a) / a = q^(a+b) expm1(a d) / a
        # for every a != 0, with the limit q^b d at a = 0.
        w = torch.exp(b * logq) * d if a == 0 else torch.exp((a + b) * logq) * torch.expm1(a * d) / a
        if a == 0 and b == 0:  # 1/2 (log p - log q)^2
            per = 0.5 * d * d
        elif a == 0:  # 1/b^2 (q^b log(q^b / p^b) - q^b + p^b)
            per = torch.exp(b * logq) * (torch.expm1(b * d) - b * d) / (b * b)
        elif b == 0:  # 1/a^2 (p^a log(p^a / q^a) - p^a + q^a), with 0 log 0 = 0
            r = torch.exp(a * d)
            per = torch.exp(a * logq) * (torch.where(r > 0, r * (a * d), torch.zeros_like(r)) - torch.expm1(a * d)) / (a * a)
        elif a + b == 0:  # 1/a^2 ((p/q)^a - a log(p/q) - 1)
            per = (torch.expm1(a * d) - a * d) / (a * a)
        else:
            s = a + b
            per = -torch.exp(s * logq) * (torch.expm1(a * d) - a / s * torch.expm1(s * d)) / (a * b)
        return w, per.sum(-1)


class UniversalLogitDistillation(Objective):
    """ULD, the Universal Logit Distillation loss (Boizard et al. 2024, arXiv 2402.12030), as TRL's GOLD uses it.

    The Wasserstein-1 distance between the two next-token distributions under a transport cost
    that ignores which token is which: both probability vectors sorted in decreasing order, the
    shorter one padded with zeros, `D = sum_i |q_(i) - p_(i)|`. It needs no shared vocabulary, so
    it is the vocabulary-sized objective across tokenizers (`teacher.cross_tokenizer=true`); the
    authors train `CE + lambda * D` (here `ce_weight=1, kd_weight=lambda`). The weight of token v,
    at student rank k, is `-q(v) sign(q(v) - p_(k))` (`dD/dq(v)` with the ranks held fixed, which
    is the gradient wherever no two probabilities tie).
    """

    name = "uld"
    support = "vocab"
    summary = "ULD: L1 between sorted probability vectors (Boizard et al. 2024); needs no shared vocabulary"

    def weights(self, logq, teacher: TeacherChunk, labels, sample):
        q = logq.exp()
        ps = teacher.sorted_logp(self.name).exp().to(q.dtype)
        qs, order = q.sort(-1, descending=True)
        n = max(qs.shape[1], ps.shape[1])
        diff = torch.nn.functional.pad(qs, (0, n - qs.shape[1])) - torch.nn.functional.pad(ps, (0, n - ps.shape[1]))
        w = torch.empty_like(q).scatter_(1, order, -qs * diff[:, :qs.shape[1]].sign())
        return TokenWeights(weights=w, tokens=None, value=diff.abs().sum(-1))
