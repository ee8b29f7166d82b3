"""An LM head as the losses see it: `logits = transform(h @ W.T + b)`.

Most causal LMs return `h @ W.T + b` from their final hidden states; some change it before
returning it: Gemma 2 caps it (`c * tanh(z / c)`, `final_logit_softcapping`), Granite divides it
(`logits_scaling`), Cohere multiplies it (`logit_scale`). `LogitTransform` is that step,
`z -> c * tanh(s * z / c)` (or `s * z` without a cap), and `LMHead` holds it with the weight and
bias, so every memory-lean path (the student's chunked loss, the teacher's `HeadTeacher`, the
teacher cache) computes the logits the model itself returns. `hpd.models.head.lm_head_of(model)` reads
them off a model (or refuses one whose head does something else).

    >>> import torch
    >>> from hpd.objectives.head import LMHead, LogitTransform
    >>> head = LMHead(torch.randn(50, 16), None, LogitTransform(scale=0.5, softcap=3.0))
    >>> z = head.logits(torch.randn(4, 16))
    >>> z.shape, bool(z.abs().max() < 3.0)
    (torch.Size([4, 50]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hpd.errors import HPDError


@dataclass(frozen=True)
class LogitTransform:
    """`z -> softcap * tanh(scale * z / softcap)`, or `scale * z` when `softcap` is None.

    scale:   a positive factor (Granite's `1 / logits_scaling`, Cohere's `logit_scale`).
    softcap: a positive cap (Gemma 2's `final_logit_softcapping`), or None.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise HPDError(f"a logit scale must be positive and finite, got {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise HPDError(f"a logit softcap must be positive and finite, got {self.softcap}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: Tensor) -> Tensor:
        """The transformed logits, out of place (autograd flows through): `(..., V)` -> `(..., V)`."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def apply_(self, z: Tensor) -> Tensor | None:
        """Transform `z (C, V)` in place (no autograd); return `dz'/dz` as `(C, V)` when it varies
        per entry (a softcap), else None (the derivative is then the constant `scale`)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is None:
            return None
        c = self.softcap
        z.div_(c).tanh_()
        deriv = z.square().neg_().add_(1.0).mul_(self.scale)  # scale * (1 - tanh^2)
        z.mul_(c)
        return deriv

    def backward_(self, g: Tensor, deriv: Tensor | None) -> Tensor:
        """`g (C, V)`, a gradient with respect to the transformed logits, turned in place into one with
        respect to `h @ W.T + b`; `deriv` is what `apply_` returned."""
        if deriv is not None:
            return g.mul_(deriv)
        return g.mul_(self.scale) if self.scale != 1.0 else g


IDENTITY = LogitTransform()


@dataclass
class LMHead:
    """The output projection and what follows it: `logits = transform(h @ weight.T + bias)`.

    weight: `(V, H)`; bias: `(V,)` or None; transform: a `LogitTransform` (identity by default).
    """

    weight: Tensor
    bias: Tensor | None = None
    transform: LogitTransform = field(default=IDENTITY)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """`hidden (..., H)` -> the model's logits `(..., V)` (autograd flows through)."""
        z = hidden @ self.weight.T
        if self.bias is not None:
            z = z + self.bias
        return self.transform(z)

    def detached(self) -> LMHead:
        """The same head on detached tensors (a teacher's view keeps the weights of this moment)."""
        return LMHead(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.transform)


def as_lm_head(weight: Tensor | LMHead, bias: Tensor | None = None) -> LMHead:
    """An `LMHead` from one, or from a bare weight `(V, H)` and bias (an identity transform)."""
    if isinstance(weight, LMHead):
        if bias is not None:
            raise HPDError("pass the bias inside the LMHead, not as lm_head_bias as well")
        return weight
    return LMHead(weight, bias)


__all__ = ["IDENTITY", "LMHead", "LogitTransform", "as_lm_head"]
