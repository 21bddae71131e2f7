"""The examples in the policy modules' docstrings are executed, so they cannot rot."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import proxy.policy

MODULES = sorted(m.name for m in pkgutil.iter_modules(proxy.policy.__path__, "proxy.policy."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
