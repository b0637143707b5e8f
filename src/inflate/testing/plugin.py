"""pytest plugin (entry point ``inflate``): a fixture for a three-line test.

Example test file in your project::

    def test_my_net_inflates(check_inflation):
        check_inflation(MyNet(), num_inputs=2, init="zero")
"""

from __future__ import annotations

from typing import Any, Callable

import pytest


@pytest.fixture
def check_inflation() -> Callable[..., Any]:
    """:func:`inflate.testing.check_inflation`: copy, inflate, run both, assert."""
    from inflate.testing import check_inflation as check

    return check
