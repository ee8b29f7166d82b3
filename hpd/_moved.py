"""Old import paths of the modules that moved to `hpd.apps` keep working for one release.

An old module (`hpd/evaluate.py`, ...) is a two-line file that calls `alias`: importing it gives
the new module itself (same object, so a monkeypatch or an isinstance check through either path
sees the same thing, and a pickle naming the old path loads).

    >>> import hpd.evaluate, hpd.apps.evaluate
    >>> hpd.evaluate is hpd.apps.evaluate
    True

To be removed in the release after the move (the library never imports these paths).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def alias(old: str, new: str, submodules: tuple[str, ...] = ()) -> ModuleType:
    """Make the module name `old` (and `old.SUB` for each of `submodules`) the module `new`."""
    module = importlib.import_module(new)
    for sub in submodules:
        sys.modules[f"{old}.{sub}"] = importlib.import_module(f"{new}.{sub}")
    sys.modules[old] = module  # what `import old` returns once the old file has run
    return module
