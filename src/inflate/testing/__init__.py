"""Property-testing toolkit: prove, for your own network, that inflation is exact.

Hypothesis strategies build random small conv networks and matching inputs;
assertion helpers compare an inflated model with the original at the widened
layers and at the output, and say where and by how much they differ.

Example:
    >>> import torch, torch.nn as nn
    >>> from inflate.testing import check_inflation
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    >>> report = check_inflation(net, num_inputs=2, init="zero", example_input=torch.zeros(1, 3, 16, 16))
    >>> report.max_relative_diff < 1e-10
    True
"""

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
