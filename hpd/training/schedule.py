"""The learning-rate schedule: the factor of each step, used by the training loop and by resume's
note on a changed schedule (one definition, so the two never disagree).

    >>> from hpd.config import Config
    >>> cfg = Config(); cfg.max_steps = 10; cfg.optim.warmup_ratio = 0.2; cfg.optim.schedule = "linear"
    >>> cfg.optim.min_lr_ratio = 0.0
    >>> [round(lr_lambda(cfg)(s), 3) for s in (0, 1, 2, 6, 10)]
    [0.333, 0.667, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import math

from hpd.config import Config


def lr_lambda(cfg: Config):
    """The learning-rate factor of each step (0-based): linear warm-up, then the schedule to min_lr_ratio."""
    o, total = cfg.optim, cfg.max_steps
    warmup = int(round(o.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if o.schedule == "constant":
            decay = 1.0
        elif o.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay

    return f
