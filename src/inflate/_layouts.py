"""Layouts of meta tensors: what the shape rules of :mod:`inflate._shapes` share.

A rule answers with a new meta tensor whose shape, dtype and strides are those
PyTorch would give, or with :data:`MISSING` when it is not sure. These helpers
say whether operands are plain (floating meta tensors of one dtype, dense) and
make the answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MISSING", "Rule", "META", "meta_like"]

#: Returned by a rule that does not apply.
MISSING: Any = object()

#: ``rule(args, kwargs)``: the output ``func(*args, **kwargs)`` would give on meta tensors, or :data:`MISSING`.
Rule = Callable[[Sequence[Any], dict[str, Any]], Any]


def meta_float(first: Any, *others: Any) -> bool:
    """All are floating meta tensors of one dtype (``others`` may also be None)."""
    if not isinstance(first, Tensor) or not first.is_meta or not first.is_floating_point():
        return False
    dtype = first.dtype
    for t in others:  # a plain loop: this runs for almost every operation of a trace
        if t is not None and not (isinstance(t, Tensor) and t.is_meta and t.dtype == dtype):
            return False
    return True


def dense(x: Tensor) -> bool:
    """Non-overlapping and dense in some dimension order: ``empty_like`` keeps its strides."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return True
    order = sorted(range(x.ndim), key=lambda d: x.stride(d))
    expected = 1
    for d in order:
        if x.shape[d] != 1 and x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True


#: The meta device (an object: parsing the string costs more than making a meta tensor).
META = torch.device("meta")


def empty_meta(shape: Sequence[int], like: Tensor) -> Tensor:
    """A new contiguous meta tensor of ``shape`` and ``like``'s dtype."""
    return torch.empty(shape, dtype=like.dtype, device=META)


def same_layout(x: Tensor) -> Tensor:
    """A new meta tensor with ``x``'s shape, strides and dtype (``x`` known to be dense)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=META)


def meta_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x, device="meta")``: the same strides when ``x`` is dense, without
    the Python path that ``empty_like`` takes for a meta ``x`` (about 30x slower)."""
    if not x.is_meta:
        return torch.empty_like(x, device=META)  # all in C++: keeps a dense x's strides
    if dense(x):
        return same_layout(x)
    return torch.empty_like(x, device=META)


def arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def as_tuple(value: Any, dims: int) -> tuple[int, ...] | None:
    if type(value) is int:
        return (value,) * dims
    if isinstance(value, (tuple, list)):
        for v in value:
            if not isinstance(v, int):
                return None
        if len(value) == dims:
            return tuple(value)
        return tuple(value) * dims if len(value) == 1 else None
    return None


def like_layout(x: Tensor, shape: Sequence[int]) -> Any:
    """A new tensor of ``shape`` in ``x``'s layout, if that is plainly contiguous or channels-last."""
    if x.is_contiguous() and not is_channels_last(x):
        return empty_meta(shape, x)
    if is_channels_last(x) and not x.is_contiguous():
        return torch.empty(tuple(shape), dtype=x.dtype, device=META, memory_format=CHANNELS_LAST[x.ndim])
    return MISSING


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_channels_last(x: Tensor) -> bool:
    return x.ndim in CHANNELS_LAST and x.is_contiguous(memory_format=CHANNELS_LAST[x.ndim])
