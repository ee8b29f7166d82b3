"""Every module's docstring examples run and print what they say (a wrong example is a defect)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hpd

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _modules() -> list[str]:
    """hpd's modules (every one: the package has no old-path aliases)."""
    names = ["hpd"] + [m.name for m in pkgutil.walk_packages(hpd.__path__, "hpd.") if ".assets" not in m.name]
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_module_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples fail (output above)"
