"""Assertions that an inflated model is equivalent to the original, with helpful messages.

The models are called as :func:`inflate.inflate_first_conv` describes with
``example_input``/``input_arg`` (:mod:`inflate._call`): the input alone, or a tuple of
positional or a dict of keyword arguments with the input among them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._call import Call, Example, as_call
from .._inflate import inflate_first_conv
from .._ops import tensors
from .._tracer import unwrap

__all__ = [
    "Report",
    "assert_repeat_equivalent",
    "assert_zero_inflation_equivalent",
    "check_inflation",
    "default_rtol",
]

# Relative L2 tolerances; default_rtol's docstring says why.
_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative L2 tolerance for ``dtype``.

    Both models compute the same sums, reordered or padded with exact zeros (zero
    rule) or split into N parts (repeat rule): the error is a few ulps per
    accumulation, about ``sqrt(K) * eps`` for K-term sums. With ``eps = 2.2e-16`` in
    float64 and K up to ~1e5 that is ~1e-13; ``1e-10`` leaves a 1000x margin and still
    catches one weight perturbed by one part in a million in a 3x3x3 kernel.
    float32 (``eps = 1.2e-7``) gets ``1e-4``, float16 and bfloat16 (``eps ~ 1e-3``)
    ``2e-2``; other dtypes ``1e-4``.

    Example:
        >>> default_rtol(torch.float64)
        1e-10
    """
    return _RTOL.get(dtype, 1e-4)


@dataclass
class Report:
    """Relative L2 differences found by a check, per compared place (``"output"`` and layer names)."""

    diffs: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_diff(self) -> float:
        """The largest relative difference over all compared places."""
        return max(self.diffs.values(), default=0.0)


def _relative_diff(got: Tensor, expected: Tensor) -> float:
    scale = expected.norm().item()
    return (got - expected).norm().item() / (scale if scale > 0 else 1.0)


def _describe(place: str, got: Tensor, expected: Tensor, rel: float, rtol: float) -> str:
    diff = (got - expected).abs().nan_to_num(float("inf"))
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return (f"{place}: relative L2 difference {rel:.3e} > rtol {rtol:.1e}; largest at index {idx}: "
            f"expected {expected[idx].item():.6g}, got {got[idx].item():.6g} (|diff| {diff[idx].item():.3e})")


@contextmanager
def _capture(model: nn.Module, names: Sequence[str], store: dict[str, Tensor]) -> Iterator[None]:
    target = unwrap(model)
    handles = []
    for name in names:
        def hook(_: nn.Module, __: Any, out: Any, name: str = name) -> None:
            store[name] = out
        handles.append(target.get_submodule(name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _concat(inputs: Sequence[Any]) -> Any:
    """The inflated model's input: tensors ``(B, C_i, ...)`` concatenated along channels, or
    lists of images ``(C_i, H, W)`` concatenated image by image."""
    if all(isinstance(x, Tensor) for x in inputs):
        return torch.cat(list(inputs), dim=1)
    return [torch.cat(list(images), dim=0) for images in zip(*inputs)]


def _calls(example_input: Example | None, input_arg: int | str | None, x_original: Any,
           x_inflated: Any) -> tuple[Call, Call]:
    """The calls of the original and the inflated model: ``example_input`` (default: the input
    alone) with its input replaced by ``x_original`` and ``x_inflated``."""
    call = as_call(x_original if example_input is None else example_input, input_arg)
    return call.with_input(x_original), call.with_input(x_inflated)


def _compare(original: nn.Module, inflated: nn.Module, call_original: Call, call_inflated: Call,
             layers: Sequence[str], rtol: float | None, output_rtol: float | None = None) -> Report:
    rtol = default_rtol(tensors(call_original.input)[0].dtype) if rtol is None else rtol
    output_rtol = rtol if output_rtol is None else output_rtol
    seen_a: dict[str, Tensor] = {}
    seen_b: dict[str, Tensor] = {}
    with torch.no_grad(), _capture(original, layers, seen_a), _capture(inflated, layers, seen_b):
        expected, got = tensors(call_original(original)), tensors(call_inflated(inflated))
    report, problems = Report(), []
    pairs = [(f"layer '{n}'", seen_b[n], seen_a[n]) for n in layers if n in seen_a and n in seen_b]
    if not expected or len(got) != len(expected):
        problems.append(f"output: expected {len(expected) or 'some'} tensors, got {len(got)}")
    # a model output with several tensors (a tuple, a ModelOutput): each compared
    places = ["output"] if len(expected) == 1 else [f"output[{i}]" for i in range(len(expected))]
    pairs.extend(zip(places, got, expected))
    for place, g, e in pairs:
        if g.shape != e.shape:
            problems.append(f"{place}: expected shape {tuple(e.shape)}, got {tuple(g.shape)}")
            continue
        rel = report.diffs[place] = _relative_diff(g, e)
        tol = output_rtol if place.startswith("output") else rtol
        if not rel <= tol:  # also catches NaN
            problems.append(_describe(place, g, e, rel, tol))
    if problems:
        raise AssertionError("inflated model is not equivalent:\n  " + "\n  ".join(problems))
    return report


def assert_zero_inflation_equivalent(
    original: nn.Module,
    inflated: nn.Module,
    inputs: Sequence[Tensor],
    *,
    example_input: Example | None = None,
    input_arg: int | str | None = None,
    compare_at: Sequence[str] = (),
    rtol: float | None = None,
    output_rtol: float | None = None,
) -> Report:
    """Assert ``inflated(cat(inputs))`` equals ``original(inputs[0])``, whatever ``inputs[1:]`` hold.

    This is the guarantee of ``init="zero"``.

    Args:
        original: the model before inflation.
        inflated: the model after inflation.
        inputs: one tensor ``(B, C_i, ...)`` per input; concatenated along channels.
        example_input: the call both models get, in the forms
            :func:`inflate.inflate_first_conv` takes: a tuple of positional or a dict of
            keyword arguments (a diffusers UNet's ``{"sample": x, "timestep": t}``). Its
            input is replaced by ``inputs[0]`` for the original and by the concatenation
            for the inflated model; the other arguments are passed to both as they are.
            Default: the input alone.
        input_arg: which argument of ``example_input`` is the input, by position or
            keyword; default the first tensor argument.
        compare_at: module names whose outputs are compared as well (the widened
            layers, :func:`inflate.find_input_layers`): a normalization
            right after the stem can hide a stem error at the output.
        rtol: relative L2 tolerance; default :func:`default_rtol` of the input dtype.
        output_rtol: tolerance at the output only (default ``rtol``): a deep, badly
            conditioned network amplifies the rounding of the widened layers, which
            ``rtol`` still bounds at those layers.

    An output of several tensors (a tuple, a dict, a ``ModelOutput``) is compared tensor
    by tensor, as ``"output[i]"``.

    Returns:
        The relative differences found.

    Raises:
        AssertionError: naming the place, the relative difference and the worst element.
        InflateError: ``example_input`` or ``input_arg`` is not a call with an input.

    Example:
        >>> import copy, torch.nn as nn
        >>> from inflate import inflate_first_conv
        >>> net = nn.Conv2d(3, 4, 3).double()
        >>> wide = inflate_first_conv(copy.deepcopy(net), 2, init="zero")
        >>> x1, x2 = torch.randn(2, 1, 3, 8, 8, dtype=torch.float64)
        >>> assert_zero_inflation_equivalent(net, wide, [x1, x2]).max_relative_diff < 1e-12
        True
    """
    calls = _calls(example_input, input_arg, inputs[0], _concat(inputs))
    return _compare(original, inflated, *calls, compare_at, rtol, output_rtol)


def assert_repeat_equivalent(
    original: nn.Module,
    inflated: nn.Module,
    x: Tensor,
    num_inputs: int,
    *,
    example_input: Example | None = None,
    input_arg: int | str | None = None,
    compare_at: Sequence[str] = (),
    rtol: float | None = None,
    output_rtol: float | None = None,
) -> Report:
    """Assert ``inflated`` on ``num_inputs`` copies of ``x`` equals ``original(x)``.

    This is the guarantee of ``init="repeat"`` with ``scale=True``; arguments as in
    :func:`assert_zero_inflation_equivalent`.

    Example:
        >>> import copy, torch.nn as nn
        >>> from inflate import inflate_first_conv
        >>> net = nn.Conv1d(2, 4, 3).double()
        >>> wide = inflate_first_conv(copy.deepcopy(net), 3, init="repeat")
        >>> assert_repeat_equivalent(net, wide, torch.randn(1, 2, 9, dtype=torch.float64), 3).diffs["output"] < 1e-12
        True
    """
    calls = _calls(example_input, input_arg, x, _concat([x] * num_inputs))
    return _compare(original, inflated, *calls, compare_at, rtol, output_rtol)


def check_inflation(
    model: nn.Module,
    num_inputs: int = 2,
    *,
    init: str = "zero",
    example_input: Example | None = None,
    input_arg: int | str | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    rtol: float | None = None,
) -> Report:
    """Copy ``model``, inflate the copy, run both on random inputs and assert the guarantee.

    ``init="zero"`` checks that the extra inputs are ignored (they get random values);
    ``init="repeat"`` (scaled) checks that ``num_inputs`` identical inputs give the
    original output. Both models run in ``eval`` mode in ``dtype`` (float64
    recommended), and are compared at every widened layer and at the output.

    Args:
        model: your network (not modified).
        num_inputs: ``N``.
        init: ``"zero"`` or ``"repeat"``.
        example_input: what the model is called with, in the forms
            :func:`inflate.inflate_first_conv` takes: a tensor ``(B, C, ...)``, a tuple of
            positional or a dict of keyword arguments. The input's shape is used for the
            random inputs; the other arguments are passed as they are (floating-point ones
            in ``dtype``; meta tensors among them get random normal values, or zeros if
            integer). Default: the example :func:`inflate.find_input_layers` would use
            (a known config's, such as a diffusers UNet's or a transformers model's,
            else a guessed shape).
        input_arg: which argument of ``example_input`` is the input, by position or
            keyword; default the first tensor argument.
        dtype: the dtype both models run in.
        seed: seed of the random inputs.
        rtol: relative L2 tolerance; default :func:`default_rtol` of ``dtype``.

    Returns:
        The relative differences found.

    Raises:
        AssertionError: the inflated model is not equivalent, where and by how much.
        InflateError: the model cannot be inflated (as :func:`inflate.inflate_first_conv`
            raises), or ``example_input`` is not a call with an input.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU())
        >>> check_inflation(net, 4, init="repeat", example_input=torch.zeros(2, 1, 6, 6, 6)).diffs.keys()
        dict_keys(["layer '0'", 'output'])
        >>> class Conditioned(nn.Module):  # a forward with another tensor argument
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.embed = nn.Conv2d(3, 4, 3), nn.Linear(1, 4)
        ...     def forward(self, x, t):
        ...         return self.conv(x) + self.embed(t)[:, :, None, None]
        >>> example = {"t": torch.ones(1, 1), "x": torch.zeros(1, 3, 8, 8)}
        >>> check_inflation(Conditioned(), 2, example_input=example, input_arg="x").diffs.keys()
        dict_keys(["layer 'conv'", 'output'])
    """
    from .._discovery import discover
    from .._examples import default_example_calls

    if init not in ("zero", "repeat"):
        raise ValueError(f"init: expected 'zero' or 'repeat', got {init!r}")
    given = None if example_input is None else as_call(example_input, input_arg)  # validated before copying
    original = copy.deepcopy(unwrap(model)).to(dtype).eval()
    call = default_example_calls(original)[0] if given is None else given
    gen = torch.Generator().manual_seed(seed)

    def draw(template: Any) -> Any:  # a random input shaped like the example's
        if isinstance(template, Tensor):
            return torch.randn(template.shape, generator=gen, dtype=dtype)
        return [torch.randn(t.shape, generator=gen, dtype=dtype) for t in template]

    def other(t: Tensor) -> Tensor:  # any other argument: real, in dtype if floating point
        if t.is_meta:
            return torch.randn(t.shape, generator=gen, dtype=dtype) if t.is_floating_point() \
                else torch.zeros(t.shape, dtype=t.dtype)
        return t.to(dtype) if t.is_floating_point() else t

    xs = [draw(call.input) for _ in range(num_inputs)]
    call = call.map(other).with_input(xs[0])
    found = discover(original, call)
    found.raise_problems()
    inflated = inflate_first_conv(copy.deepcopy(original), num_inputs, init=init, example_input=call)
    names = [layer.name for layer in found.layers]
    if init == "zero":
        return assert_zero_inflation_equivalent(original, inflated, xs, example_input=call, compare_at=names,
                                                rtol=rtol)
    return assert_repeat_equivalent(original, inflated, xs[0], num_inputs, example_input=call, compare_at=names,
                                    rtol=rtol)
