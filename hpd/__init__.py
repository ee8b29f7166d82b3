"""hpd: Hybrid Policy Distillation and the distillation objectives of the literature.

    >>> import torch, hpd
    >>> obj = hpd.get_objective("hpd")
    >>> s = torch.randn(2, 5, 11, requires_grad=True); t = torch.randn(2, 5, 11)
    >>> labels = torch.randint(0, 11, (2, 5))
    >>> out = obj(s, t, labels, generator=torch.Generator().manual_seed(0))
    >>> out.loss.backward()
"""

from hpd.errors import HPDError
from hpd.objectives import get_objective, OBJECTIVES
from hpd.version import __version__

__all__ = ["HPDError", "get_objective", "OBJECTIVES", "__version__"]


def __getattr__(name):
    # The trainer pulls in transformers/accelerate: import it only when asked for.
    if name == "train":
        from hpd.training.trainer import train

        return train
    raise AttributeError(name)
