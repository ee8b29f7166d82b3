"""Seeds derived from several parts (the run's seed, the step, the rank, a salt): one rule, so that
every random draw of a run (regimes, rollouts, the engine, the data order) is reproducible.

    >>> from hpd.seeds import derive_seed
    >>> derive_seed(3, 0, "mixed") == derive_seed(3, 0, "mixed") != derive_seed(3, 1, "mixed")
    True
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (seed, step, rank, ...)."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
