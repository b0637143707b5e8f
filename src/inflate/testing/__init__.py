"""Property-testing toolkit: prove, for your own network, that inflation is exact.

Hypothesis strategies build random small conv networks and matching inputs;
assertion helpers compare an inflated model with the original at the widened
layers and at the output, and say where and by how much they differ.

It needs Hypothesis, which the ``testing`` extra installs:
``pip install "torch-inflate[testing]"``.

Example:
    >>> import torch, torch.nn as nn
    >>> from inflate.testing import check_inflation
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    >>> report = check_inflation(net, num_inputs=2, init="zero", example_input=torch.zeros(1, 3, 16, 16))
    >>> report.max_relative_diff < 1e-10
    True
"""

try:
    import hypothesis  # noqa: F401 - the strategies need it; fail here, with the fix in the message
except ImportError as err:  # pragma: no cover - exercised in a subprocess by tests/test_toolkit.py
    raise ImportError(
        "inflate.testing: expected the 'hypothesis' package (>= 6.100), got none installed "
        f"({err}); install the extra with: pip install \"torch-inflate[testing]\""
    ) from err

from ._assertions import (
    Report,
    assert_repeat_equivalent,
    assert_zero_inflation_equivalent,
    check_inflation,
    default_rtol,
)
from ._strategies import SmallConvNet, conv_nets, input_batches

__all__ = [
    "Report",
    "SmallConvNet",
    "assert_repeat_equivalent",
    "assert_zero_inflation_equivalent",
    "check_inflation",
    "conv_nets",
    "default_rtol",
    "input_batches",
]
