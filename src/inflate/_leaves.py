"""The operations a stock layer's forward makes, so that a trace can make them without the forward.

A trace (:mod:`inflate._tracer`) costs Python time per module call and per
operation. Most modules of a real network are stock layers whose forward makes a
single functional call: a convolution with zero padding, ``linear``, a batch,
layer or group norm, an activation, dropout, a pooling. For those,
:func:`lowering` gives the calls the forward makes, written exactly as the
:class:`~torch.overrides.TorchFunctionMode` of the trace receives them (the same
function, and the same arguments, positional or keyword as the forward passes
them), so the tracer can take them directly and skip the forward's own Python
(attribute reads, argument checks, the ``torch.nn.functional`` wrapper and the
torch-function dispatch). ``tests/test_leaves.py`` records what the real forward
makes and compares, for every layer kind here.

Only a module whose class uses the stock ``forward`` itself gets a lowering (a
subclass that overrides ``forward``, or ``_conv_forward``, does not), and only
in the plain case: zero padding, a batch norm with a momentum, pooling without
indices. Anything else returns ``None`` and the real forward runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Call", "lowering"]

#: One operation as a TorchFunctionMode receives it: ``(func, args, kwargs)``.
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
#: ``lower(module, x)``: the calls ``module(x)`` makes, the output being the last one's; or None.
Lower = Callable[[Any, Tensor], "list[Call] | None"]


def _conv(func: Callable[..., Any], stock: Callable[..., Any]) -> Lower:
    def lower(m: Any, x: Tensor) -> list[Call] | None:
        if m.padding_mode != "zeros" or type(m)._conv_forward is not stock:
            return None
        return [(func, (x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups), {})]

    return lower


def _batch_norm(m: Any, x: Tensor) -> list[Call] | None:
    try:
        m._check_input_dim(x)
    except ValueError:
        return None  # the forward raises it
    if m.momentum is None:
        return None  # a cumulative average reads the counter's value
    calls: list[Call] = []
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        calls.append((Tensor.add_, (m.num_batches_tracked, 1), {}))
    training = m.training or (m.running_mean is None and m.running_var is None)
    keep = not m.training or m.track_running_stats
    calls.append((F.batch_norm, (x, m.running_mean if keep else None, m.running_var if keep else None),
                   {"weight": m.weight, "bias": m.bias, "training": training, "momentum": m.momentum,
                    "eps": m.eps}))
    return calls


def _max_pool(m: Any, x: Tensor) -> list[Call] | None:
    if m.return_indices:
        return None
    return [(F.max_pool2d, (x, m.kernel_size), {"stride": m.stride, "padding": m.padding, "dilation": m.dilation,
                                                 "ceil_mode": m.ceil_mode, "return_indices": False})]


def _inplace(func: Callable[..., Any]) -> Lower:
    return lambda m, x: [(func, (x,), {"inplace": m.inplace})]


_LOWER: dict[Callable[..., Any], Lower] = {
    nn.Conv1d.forward: _conv(F.conv1d, nn.Conv1d._conv_forward),
    nn.Conv2d.forward: _conv(F.conv2d, nn.Conv2d._conv_forward),
    nn.Conv3d.forward: _conv(F.conv3d, nn.Conv3d._conv_forward),
    nn.Linear.forward: lambda m, x: [(F.linear, (x, m.weight, m.bias), {})],
    nn.modules.batchnorm._BatchNorm.forward: _batch_norm,
    nn.LayerNorm.forward: lambda m, x: [(F.layer_norm, (x, m.normalized_shape),
                                          {"weight": m.weight, "bias": m.bias, "eps": m.eps})],
    nn.GroupNorm.forward: lambda m, x: [(F.group_norm, (x, m.num_groups),
                                          {"weight": m.weight, "bias": m.bias, "eps": m.eps})],
    nn.ReLU.forward: _inplace(F.relu),
    nn.SiLU.forward: _inplace(F.silu),
    nn.Hardswish.forward: _inplace(F.hardswish),
    nn.Hardsigmoid.forward: _inplace(F.hardsigmoid),
    nn.Mish.forward: _inplace(F.mish),
    nn.Hardtanh.forward: lambda m, x: [(F.hardtanh, (x,), {"min_val": m.min_val, "max_val": m.max_val,
                                                            "inplace": m.inplace})],
    nn.LeakyReLU.forward: lambda m, x: [(F.leaky_relu, (x,), {"negative_slope": m.negative_slope,
                                                               "inplace": m.inplace})],
    nn.ELU.forward: lambda m, x: [(F.elu, (x,), {"alpha": m.alpha, "inplace": m.inplace})],
    nn.GELU.forward: lambda m, x: [(F.gelu, (x,), {"approximate": m.approximate})],
    nn.Sigmoid.forward: lambda m, x: [(torch.sigmoid, (x,), {})],
    nn.Tanh.forward: lambda m, x: [(torch.tanh, (x,), {})],
    nn.Dropout.forward: lambda m, x: [(F.dropout, (x,), {"p": m.p, "training": m.training, "inplace": m.inplace})],
    nn.MaxPool2d.forward: _max_pool,
    nn.AvgPool2d.forward: lambda m, x: [(F.avg_pool2d, (x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                         m.count_include_pad, m.divisor_override), {})],
    nn.AdaptiveAvgPool2d.forward: lambda m, x: [(F.adaptive_avg_pool2d, (x, m.output_size), {})],
}


def lowering(module: nn.Module) -> Lower | None:
    """How to lower ``module``'s forward, if it is a stock one (else ``None``).

    The module must use its class's stock ``forward`` (not overridden in a
    subclass nor on the instance) and have no parametrization (whose weight is
    computed on access).

    Example:
        >>> conv = nn.Conv2d(3, 8, 3)
        >>> x = torch.empty(1, 3, 8, 8, device="meta")
        >>> [func.__name__ for func, _, _ in lowering(conv)(conv, x)]
        ['conv2d']
        >>> lowering(nn.Sequential()) is None
        True
    """
    if "forward" in module.__dict__ or "parametrizations" in module.__dict__.get("_modules", {}):
        return None
    return _LOWER.get(type(module).forward)
