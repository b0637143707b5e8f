"""A stock layer's lowering is exactly what its forward hands a TorchFunctionMode.

For every layer kind of :mod:`inflate._leaves` (and its odd configurations), the calls
the real forward makes are recorded under a mode and compared with the lowering: the same
functions, the very same tensor objects, equal other arguments, positional or keyword
alike. Shape queries (``x.dim()``, which the forward makes to check its input) are the
only calls left out. The cases the lowering declines (reflect padding, a cumulative
batch norm, pooling with indices, overridden forwards, parametrizations) must decline.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from inflate import find_input_layers, _leaves as leaves
from inflate._leaves import Call


class Recorder(TorchFunctionMode):
    """Records the top-level calls a forward makes (inside a call the mode is off)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.Tensor.dim:
            self.calls.append((func, tuple(args), dict(kwargs)))
        return func(*args, **kwargs)


def same(a: object, b: object) -> bool:
    """Tensors must be the same object; anything else equal (and of the same type)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def same_calls(recorded: list[Call], lowered: list[Call]) -> bool:
    return len(recorded) == len(lowered) and all(
        f is g and same(a, b) and a_kw.keys() == b_kw.keys() and all(same(a_kw[k], b_kw[k]) for k in a_kw)
        for (f, a, a_kw), (g, b, b_kw) in zip(recorded, lowered))


def x4(c: int = 4) -> torch.Tensor:
    return torch.randn(2, c, 6, 7, dtype=torch.float64)


def bn(cls, c, *, train, **kw):
    return cls(c, **kw).double().train(train)


CASES = [
    ("conv1d", nn.Conv1d(3, 4, 3, stride=2), torch.randn(2, 3, 11)),
    ("conv2d", nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False), x4()),
    ("conv2d same groups", nn.Conv2d(4, 6, 3, padding="same", groups=2, dilation=2), x4()),
    ("conv3d", nn.Conv3d(2, 3, (1, 3, 3)), torch.randn(1, 2, 3, 5, 5)),
    ("linear", nn.Linear(7, 3), torch.randn(2, 5, 7)),
    ("linear no bias", nn.Linear(7, 3, bias=False), torch.randn(4, 7)),
    ("bn2d train", bn(nn.BatchNorm2d, 4, train=True), x4()),
    ("bn2d eval", bn(nn.BatchNorm2d, 4, train=False), x4()),
    ("bn2d no stats train", bn(nn.BatchNorm2d, 4, train=True, track_running_stats=False), x4()),
    ("bn2d no stats eval", bn(nn.BatchNorm2d, 4, train=False, track_running_stats=False), x4()),
    ("bn2d no affine", bn(nn.BatchNorm2d, 4, train=True, affine=False), x4()),
    ("bn1d 2d input", bn(nn.BatchNorm1d, 4, train=True), torch.randn(3, 4, dtype=torch.float64)),
    ("bn1d 3d input", bn(nn.BatchNorm1d, 4, train=False), torch.randn(3, 4, 5, dtype=torch.float64)),
    ("bn3d", bn(nn.BatchNorm3d, 2, train=True), torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)),
    ("layer norm", nn.LayerNorm(7), torch.randn(2, 5, 7)),
    ("layer norm 2 axes no bias", nn.LayerNorm((6, 7), bias=False), x4()),
    ("layer norm no affine", nn.LayerNorm(7, elementwise_affine=False), x4()),
    ("group norm", nn.GroupNorm(2, 4), x4()),
    ("relu", nn.ReLU(), x4()),
    ("relu inplace", nn.ReLU(inplace=True), x4()),
    ("relu6", nn.ReLU6(inplace=True), x4()),
    ("hardtanh", nn.Hardtanh(-2.0, 3.0), x4()),
    ("silu", nn.SiLU(), x4()),
    ("hardswish", nn.Hardswish(inplace=True), x4()),
    ("hardsigmoid", nn.Hardsigmoid(), x4()),
    ("mish", nn.Mish(), x4()),
    ("leaky relu", nn.LeakyReLU(0.2, inplace=True), x4()),
    ("elu", nn.ELU(0.5), x4()),
    ("gelu", nn.GELU(), x4()),
    ("gelu tanh", nn.GELU(approximate="tanh"), x4()),
    ("sigmoid", nn.Sigmoid(), x4()),
    ("tanh", nn.Tanh(), x4()),
    ("dropout train", nn.Dropout(0.3).train(), x4()),
    ("dropout eval", nn.Dropout(0.3).eval(), x4()),
    ("dropout inplace", nn.Dropout(0.3, inplace=True).train(), x4()),
    ("max pool", nn.MaxPool2d(3, 2, 1), x4()),
    ("max pool ceil", nn.MaxPool2d(2, ceil_mode=True), x4()),
    ("avg pool", nn.AvgPool2d(3, 2, 1, count_include_pad=False), x4()),
    ("avg pool divisor", nn.AvgPool2d(2, divisor_override=3), x4()),
    ("adaptive avg pool", nn.AdaptiveAvgPool2d((1, None)), x4()),
]


@pytest.mark.parametrize("module, x", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lowering_is_exactly_what_the_forward_hands_the_mode(module, x):
    module, x = module.double(), x.double()
    lower = leaves.lowering(module)
    assert lower is not None
    lowered = lower(module, x)  # before the forward: a batch norm's counter is read, not yet bumped
    inplace = module.__dict__.get("inplace")
    given = x.clone() if inplace else x  # an in-place forward must not change x before the comparison
    with Recorder() as recorder:
        module(given)
    if inplace:  # the forward got a clone: compare that call against the lowering's x
        recorded = recorder.calls
        assert same_calls([(f, (x, *a[1:]), kw) for f, a, kw in recorded], lowered)
    else:
        assert same_calls(recorder.calls, lowered)


def test_the_comparison_tells_a_changed_argument():  # negative control
    conv = nn.Conv2d(4, 5, 3, padding=1)
    x = x4().float()
    (func, args, kwargs), = leaves.lowering(conv)(conv, x)
    with Recorder() as recorder:
        conv(x)
    assert same_calls(recorder.calls, [(func, args, kwargs)])
    assert not same_calls(recorder.calls, [(func, (*args[:4], (0, 0), *args[5:]), kwargs)])  # another padding
    assert not same_calls(recorder.calls, [(func, (x.clone(), *args[1:]), kwargs)])  # another tensor
    assert not same_calls(recorder.calls, [(F.conv1d, args, kwargs)])  # another function
    assert not same_calls(recorder.calls, [(func, args, {"groups": 1})])  # an added keyword


class Scaled(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class Padded(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(F.pad(x, (1, 1, 1, 1)), weight, bias)


def _with_instance_forward():
    conv = nn.Conv2d(3, 4, 3)
    conv.forward = lambda x: x  # type: ignore[method-assign]
    return conv


def _parametrized():
    conv = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", nn.Identity())
    return conv


DECLINED = [
    ("reflect padding", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.randn(1, 3, 8, 8)),
    ("cumulative batch norm", lambda: nn.BatchNorm2d(3, momentum=None), torch.randn(2, 3, 4, 4)),
    ("batch norm of the wrong rank", lambda: nn.BatchNorm2d(3), torch.randn(2, 3, 4)),
    ("max pool with indices", lambda: nn.MaxPool2d(2, return_indices=True), torch.randn(1, 3, 4, 4)),
]


@pytest.mark.parametrize("make, x", [c[1:] for c in DECLINED], ids=[c[0] for c in DECLINED])
def test_odd_configurations_run_the_real_forward(make, x):
    module = make()
    assert leaves.lowering(module)(module, x) is None


@pytest.mark.parametrize("make", [Scaled, Padded, _with_instance_forward, _parametrized, nn.SyncBatchNorm],
                         ids=["overridden forward", "overridden _conv_forward", "instance forward",
                              "parametrization", "sync batch norm"])
def test_modules_that_are_not_stock_get_no_lowering(make):
    module = make(3, 4, 3) if make in (Scaled, Padded) else make(3) if make is nn.SyncBatchNorm else make()
    lower = leaves.lowering(module)
    assert lower is None or lower(module, torch.randn(1, 3, 8, 8)) is None


def test_discovery_through_lowered_layers_matches_the_real_forwards(monkeypatch):
    """The layers found, and the problems, are the same with the lowering switched off."""
    from inflate import _discovery as discovery, _tracer as tracing

    def both(model, x):
        with_lowering = discovery.discover(model, x)
        with monkeypatch.context() as off:
            off.setattr(tracing.Tracer, "lowered", lambda self, module: None)
            without = discovery.discover(model, x)
        return with_lowering, without

    class Twice(nn.Module):  # one conv reads the input, then its own output: a problem either way
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    cases = [
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                       nn.Conv2d(8, 4, 1)), torch.randn(2, 3, 16, 16)),
        (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 8, 8)),  # per-channel affine
        (nn.Sequential(nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(3, 4, 3), nn.GELU()), torch.randn(2, 3, 8, 8)),
        (Twice(), torch.randn(2, 3, 8, 8)),
        (nn.Sequential(nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 2)), torch.randn(2, 3, 2, 2)),
    ]
    for model, x in cases:
        a, b = both(model, x)
        assert (a.layers, a.problems) == (b.layers, b.problems)
    assert find_input_layers(cases[0][0], cases[0][1]) == ["0"]
    assert both(*cases[3])[0].problems == ["layer 'conv' reads the input and also other tensors: widening it would "
                                           "break those other uses"]


def test_a_tensor_subclass_runs_the_real_forward():
    """The lowered calls are made with torch functions off, which would skip a subclass's own
    ``__torch_function__``: a subclass input gets the stock forward instead."""
    from inflate._tracer import Tracer

    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    class Recording(Tracer):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(("tracer", func))
            return func(*args, **(kwargs or {}))

    conv = nn.Conv2d(3, 4, 3)
    forward = Recording({}, {}).lowered(conv)
    forward(torch.randn(1, 3, 8, 8))
    assert seen == [("tracer", F.conv2d)]  # a plain tensor: the tracer is handed the call
    seen.clear()
    forward(torch.randn(1, 3, 8, 8).as_subclass(Logged))
    assert F.conv2d in seen and not any(isinstance(s, tuple) for s in seen)
