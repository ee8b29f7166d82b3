"""A module name bound now and imported on first use, so that importing `hpd` stays fast.

`hpd --help`, `hpd train --help` and `import hpd` must not pay for torch (seconds): the objective
classes (whose parameters the config and the help are derived from) only use torch inside their
methods. `lazy_module("torch", globals())` returns a stand-in; the first attribute read imports the
real module and rebinds the global name to it, so every later use is the plain module.

    >>> import sys
    >>> ns = {}
    >>> ns["json"] = lazy_module("json", ns)
    >>> ns["json"].dumps([1])   # imports json, rebinds ns["json"]
    '[1]'
    >>> ns["json"] is sys.modules["json"]
    True
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule:
    """Stands in for the module `name` in `namespace` until its first attribute is read."""

    def __init__(self, name: str, namespace: dict[str, Any], bound_as: str):
        self._name, self._namespace, self._bound_as = name, namespace, bound_as

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        self._namespace[self._bound_as] = module  # later lookups of the name skip this stand-in
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r} (not imported yet)>"


def lazy_module(name: str, namespace: dict[str, Any], bound_as: str | None = None) -> ModuleType:
    """A stand-in for the module `name`, to be bound to `namespace[bound_as]` (default: its last
    dotted part); it imports the module and rebinds that name on the first attribute read."""
    return _LazyModule(name, namespace, bound_as or name.rpartition(".")[2])  # type: ignore[return-value]
