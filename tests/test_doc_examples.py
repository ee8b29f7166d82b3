"""Every module's docstring examples run and print what they say (a wrong example is a defect)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import hpd

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _modules() -> list[str]:
    """hpd's modules, less the old paths of moved ones (`hpd._moved`): their examples run under the new name."""
    names = ["hpd"] + [m.name for m in pkgutil.walk_packages(hpd.__path__, "hpd.") if ".assets" not in m.name]
    return sorted(n for n in names if "alias(__name__" not in Path(importlib.util.find_spec(n).origin).read_text())


@pytest.mark.parametrize("name", _modules())
def test_module_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples fail (output above)"
