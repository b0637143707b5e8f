"""Replace the weights of the input layers atomically: plan every change first, apply only if all succeed."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _standardized as standardized
from ._discovery import InputLayer, PerChannelOperand
from ._errors import InflateError
from .rules import Init, from_canonical, inflate_kernel, to_canonical

__all__ = ["Change", "plan", "apply"]


@dataclass(frozen=True)
class Change:
    """One planned replacement: a new weight and the module attributes that describe it."""

    name: str
    module: nn.Module
    attr: str
    weight: Any  # an nn.Parameter where the old one was; a list where a list of numbers was
    attrs: dict[str, Any]
    stand_in: dict[str, Any] = field(default_factory=dict)  # more attributes, for the replay only
    finish: Callable[[], None] | None = None  # run by apply after the assignments; does not fail


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.ndim == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _plan_one(model: nn.Module, layer: InputLayer, channels: Sequence[int], init: Init, scale: bool) -> Change:
    module = model.get_submodule(layer.name)
    old = getattr(module, layer.param)
    label = f"layer '{layer.name}' ({type(module).__name__})"
    if not isinstance(old, nn.Parameter):
        raise InflateError(f"{label}: expected its weight '{layer.param}' to be a Parameter, "
                           f"got {type(old).__name__}")
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise InflateError(f"{label}: expected a plain weight, found a parametrization; remove it first")
    is_conv = isinstance(module, nn.modules.conv._ConvNd)
    if layer.layout.groups > 1 and not is_conv:
        raise InflateError(f"{label}: expected groups=1 for a layer that is not an nn.Conv module, "
                           f"got groups={layer.layout.groups}")
    layout = layer.layout
    if layer.unit is not None:  # a conv in a stem that reads each input on its own: its share of each
        if any(ci % layer.unit for ci in channels):
            raise InflateError(f"{label}: its stem '{layer.name.rpartition('.')[0]}' reads each {layer.unit} "
                               f"channels of the input as one image: expected inputs of a multiple of {layer.unit} "
                               f"channels, got {tuple(channels)}")
        channels = [ci // layer.unit * layer.per_unit for ci in channels]
    # a plain conv or linear weight (out, C, *k) is its canonical kernel but for two axes of
    # size 1: a named rule can work on it directly (a callable is promised the canonical form)
    plain = isinstance(init, str) and layout.kind != "transposed" and layout.groups == layout.outer == layout.inner == 1
    std = standardized.known(module)  # a weight-standardized conv: standardized per input
    with torch.no_grad():
        if std:  # checks its layout first: a grouped weight has fewer channels
            stored, shares = standardized.widen(module, label, layout, channels, init, scale)
        kernel = old.detach() if plain or std else to_canonical(old.detach(), layout)
        if kernel.shape[1] != layer.channels:
            raise InflateError(f"{label}: expected {layer.channels} input channels in its weight, "
                               f"found {kernel.shape[1]} (weight shape {tuple(old.shape)})")
        if not std:
            stored = inflate_kernel(kernel, channels, init, scale)
        if not plain and not std:
            stored = from_canonical(stored, layout)
        if stored.dtype != old.dtype or stored.device != old.device:
            stored = stored.to(dtype=old.dtype, device=old.device)
        memory_format = _memory_format(old)
        if not stored.is_contiguous(memory_format=memory_format):
            stored = stored.contiguous(memory_format=memory_format)
    attrs: dict[str, Any] = {}
    in_axis = 0 if layer.layout.kind == "transposed" else 1
    if is_conv:
        attrs = {"in_channels": stored.shape[in_axis], "groups": 1}
    elif isinstance(module, nn.Linear):
        attrs = {"in_features": stored.shape[1]}
    else:
        attrs = {k: stored.shape[in_axis] for k in ("in_channels", "in_features")
                 if isinstance(getattr(module, k, None), int)}
    weight = nn.Parameter(stored, requires_grad=old.requires_grad)
    if std:
        return Change(layer.name, module, layer.param, weight, attrs, standardized.stand_in(module, channels, shares),
                      functools.partial(standardized.convert, module, channels, shares))
    return Change(layer.name, module, layer.param, weight, attrs)


def plan(
    model: nn.Module, layers: Sequence[InputLayer], channels: Sequence[int], init: Init, scale: bool
) -> list[Change]:
    """Compute every new weight; touches nothing.

    Raises:
        InflateError: a layer cannot be inflated; nothing was changed.
    """
    return [_plan_one(model, layer, channels, init, scale) for layer in layers]


def plan_operand(model: nn.Module, operand: PerChannelOperand, channels: Sequence[int]) -> Change:
    """A per-channel parameter or buffer widened per input: input ``i`` gets its own copy
    (an input with another channel count than ``C`` gets the mean over the channels, as
    timm's per-input ``mean``/``std``). A normalization layer's ``num_features`` follows.

    Raises:
        InflateError: the tensor is not where discovery saw it.
    """
    module = model.get_submodule(operand.name)
    old = getattr(module, operand.attr)
    if type(old) in (list, tuple):  # torchvision's image_mean: a list of C numbers
        c = len(old)
        mean = sum(old) / c
        values = [v for ci in channels for v in (old if ci == c else [mean] * ci)]
        return Change(operand.name, module, operand.attr, type(old)(values), {})  # type: ignore[arg-type]
    if not isinstance(old, torch.Tensor):
        raise InflateError(f"'{operand.name}.{operand.attr}': expected a tensor or a list, got {type(old).__name__}")
    c = old.shape[operand.axis]
    with torch.no_grad():
        mean = old.mean(operand.axis, keepdim=True) if any(ci != c for ci in channels) else None
        blocks = [old if ci == c else mean.expand(*old.shape[: operand.axis], ci, *old.shape[operand.axis + 1 :])
                  for ci in channels]
        new = torch.cat([b.detach() for b in blocks], dim=operand.axis)
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    attrs = {"num_features": new.shape[operand.axis]} if isinstance(module, nn.modules.batchnorm._NormBase) else {}
    return Change(operand.name, module, operand.attr, new, attrs)


def apply(changes: Sequence[Change]) -> None:
    """Swap in the planned weights (attribute assignments only, which do not fail)."""
    for change in changes:
        setattr(change.module, change.attr, change.weight)
        for key, value in change.attrs.items():
            setattr(change.module, key, value)
        if change.finish is not None:
            change.finish()
