"""PPO-style clipping of token weights, for rollouts reused over several optimizer steps.

With rollout reuse (`regime.minibatches` x `regime.epochs` > 1) an objective's token weights are
computed once, at rollout time, from the rollout (old) policy `q_old` and the teacher, and act as
advantages `A` of the tokens they weigh (`y`, and HPD's `y_hat`, drawn at rollout time too). A
later optimizer step, with the student `q`, trains each weighted token through the clipped
importance ratio `rho = q(v) / q_old(v)` (PPO with the dual clip of Ye et al. 2020, as verl runs
it; `eps_lo`, `eps_hi`, `c` = `regime.clip_low`, `clip_high`, `dual_clip`):

    l(v) = max(-A rho, -A clip(rho, 1 - eps_lo, 1 + eps_hi))      if A >= 0
    l(v) = min(max(-A rho, -A clip(rho, 1 - eps_lo, 1 + eps_hi)), -A c)   if A < 0
    L = (1/N) sum_t sum_v l_t(v)

Its gradient is `-(1/N) sum A rho [v not clipped] grad log q(v)`: the token-weighted form with
the detached weight `A rho [not clipped]`, so `RatioClip.apply` only rewrites the weights and the
one surrogate routine (`hpd.objectives.surrogate`) makes the loss, as for every objective. A token
is clipped when `A > 0, rho > 1 + eps_hi` (high), `A < 0, rho < 1 - eps_lo` (low) or
`A < 0, rho > c` (dual); its weight is then 0. The per-position value is `sum_v l(v)`, so the
logged value is the PPO loss itself.

    >>> import torch
    >>> from hpd.objectives.tensors import TokenWeights
    >>> from hpd.objectives.clip import RatioClip
    >>> tw = TokenWeights(weights=torch.tensor([[1.0, -1.0]]), tokens=torch.tensor([[3, 4]]), value=torch.zeros(1))
    >>> old = torch.log(torch.tensor([[0.5, 0.5]])); new = torch.log(torch.tensor([[0.7, 0.2]]))
    >>> out, stats = RatioClip(0.2, 0.28, 3.0).apply(tw, new, old, torch.tensor([3]))
    >>> out.weights   # rho = 1.4 > 1.28 with A > 0: clipped; rho = 0.4 < 0.8 with A < 0: clipped
    tensor([[0., -0.]])
    >>> [round(float(stats[k].nansum()), 2) for k in ("clip_frac_high", "clip_frac_low")]
    [1.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hpd.errors import HPDError
from hpd.objectives.tensors import TokenWeights


@dataclass(frozen=True)
class RatioClip:
    """The clip range of the importance ratio: `[1 - low, 1 + high]`, and the dual clip `dual`
    (a cap on the loss of a negative-advantage token, 0 = off; else > 1)."""

    low: float = 0.2
    high: float = 0.28
    dual: float = 3.0

    def __post_init__(self):
        if not (0.0 <= self.low < 1.0 and self.high >= 0.0 and (self.dual == 0.0 or self.dual > 1.0)):
            raise HPDError(f"ratio clip needs 0 <= low < 1, high >= 0 and dual = 0 (off) or > 1; got low={self.low}, "
                           f"high={self.high}, dual={self.dual}")

    @torch.no_grad()
    def apply(self, tw: TokenWeights, logq_K: Tensor, old_K: Tensor, labels: Tensor) -> tuple[TokenWeights, dict[str, Tensor]]:
        """Clip the advantages `tw.weights (C, K)` at `tw.tokens (C, K)`.

        logq_K: `(C, K)` the current student's log-probabilities of the tokens (detached).
        old_K:  `(C, K)` the rollout policy's, recorded at rollout time.
        labels: `(C,)` the sequence tokens `y` (sampled from the rollout policy): the approximate
                KL between the two policies is estimated at them.
        Returns the effective weights (value = the PPO loss per position) and per-entry statistics
        (NaN where not counted): the clip fractions over weighted tokens, the ratio, and
        `approx_kl` = the k3 estimate `(rho - 1) - log rho` of KL(q_old || q) at `y`.
        """
        A = tw.weights
        log_rho = logq_K - old_K
        rho = log_rho.exp()
        high = (A > 0) & (rho > 1.0 + self.high)
        low = (A < 0) & (rho < 1.0 - self.low)
        dual = (A < 0) & (rho > self.dual) if self.dual else torch.zeros_like(high)
        keep = ~(high | low | dual)
        clipped = torch.where(high, 1.0 + self.high, torch.where(low, 1.0 - self.low, rho))
        clipped = torch.where(dual, torch.full_like(rho, self.dual), clipped)
        loss_K = -A * clipped
        weighted = A != 0
        nan = torch.full_like(rho, float("nan"))
        at_y = tw.tokens == labels[:, None]
        stats = {
            "clip_frac_high": torch.where(weighted, high.to(rho.dtype), nan),
            "clip_frac_low": torch.where(weighted, low.to(rho.dtype), nan),
            "clip_frac_dual": torch.where(weighted, dual.to(rho.dtype), nan),
            "ratio": torch.where(weighted, rho, nan),
            "approx_kl": torch.where(at_y, (rho - 1.0) - log_rho, nan),
        }
        out = TokenWeights(weights=A * rho * keep, tokens=tw.tokens, value=loss_K.sum(1), stats=tw.stats)
        return out, stats


@dataclass
class RolloutWeights:
    """An objective's token weights fixed at rollout time, for a micro-batch `(B, T)`.

    weights:  `(B, T, K)` the advantages (0 at ignored positions).
    tokens:   `(B, T, K)` the tokens they weigh (`y`, HPD's `y_hat`, ...).
    old_logp: `(B, T, K)` the rollout policy's log-probabilities of those tokens (loss temperature).
    """

    weights: Tensor
    tokens: Tensor
    old_logp: Tensor

    def to(self, device) -> RolloutWeights:
        return RolloutWeights(self.weights.to(device), self.tokens.to(device), self.old_logp.to(device))

    def state_dict(self) -> dict[str, Tensor]:
        return {"weights": self.weights.cpu(), "tokens": self.tokens.cpu(), "old_logp": self.old_logp.cpu()}


__all__ = ["RatioClip", "RolloutWeights"]
