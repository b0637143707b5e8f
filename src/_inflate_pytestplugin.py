"""The pytest plugin of torch-inflate (entry point ``inflate``): the ``check_inflation`` fixture.

pytest loads every installed plugin at start-up, in every project of the environment,
whether its tests use the fixture or not. This module is therefore a top-level module
outside the ``inflate`` package (the same arrangement as Hypothesis's
``_hypothesis_pytestplugin``): importing it imports pytest only, never torch,
Hypothesis or ``inflate``. Those are imported when a test first asks for the fixture.

Example test file in your project (no import from ``inflate`` needed)::

    def test_my_net_inflates(check_inflation):
        check_inflation(MyNet(), num_inputs=2, init="zero")

Switch the plugin off with ``pytest -p no:inflate``.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

__all__ = ["check_inflation"]


@pytest.fixture
def check_inflation() -> Callable[..., Any]:
    """:func:`inflate.testing.check_inflation`: copy, inflate, run both, assert.

    Importing it here, on first use, is what keeps the plugin free at start-up. Without
    Hypothesis installed, that import raises an ``ImportError`` saying to install
    ``torch-inflate[testing]``.
    """
    from inflate.testing import check_inflation as check

    return check
