"""The examples in every module's docstrings are executed, so they cannot rot (only the policy
modules' were: two in proxy.schema and one in proxy.tls had rotted unseen)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import proxy

MODULES = sorted(m.name for m in pkgutil.walk_packages(proxy.__path__, "proxy.")
                 if m.name != "proxy.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
