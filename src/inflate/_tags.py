"""Tags: how the channel axis of the model input moves through tensor operations.

A tensor derived from the model input carries a tag. :class:`Channels` says that every
operation so far treated all input channels alike and kept them apart (elementwise maths
with channel-free operands, padding, pooling, resizing, reshapes and permutations that
keep the channel block whole), and where the channel block lies. Anything else turns it
into :class:`Lost`, which remembers the operation: a layer that later reads such a tensor
cannot be inflated exactly, and neither can a model whose output or Python control flow
depends on it. :func:`propagate` applies the rules of each kind of the op table
(:mod:`inflate._ops`); this module only decides tags, :mod:`inflate._discovery` runs the
model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from ._ops import Op, arg, name_of, tensors

__all__ = ["Channels", "Lost", "Tag", "PerChannel", "propagate", "getitem_dim", "setitem_tag"]


@dataclass(frozen=True)
class Channels:
    """The channel block of the input lies in axis ``dim``.

    Along that axis the index is ``o*C*inner + c*inner + i`` (``o < outer``);
    ``outer == inner == 1`` means the axis is exactly the ``C`` channels.
    """

    dim: int
    outer: int = 1
    inner: int = 1


@dataclass(frozen=True)
class Lost:
    """The channel structure was lost; ``why`` names the operation.

    ``unknown`` marks an operation that is missing from :data:`TABLE` (it may well
    treat channels alike: inflate just does not know).
    """

    why: str
    unknown: bool = False


Tag = Union[Channels, Lost]
Lookup = Callable[[Tensor], Union[Tag, None]]
#: ``per_channel(t, axis)``: whether ``t``, one value per input channel along ``axis``, can be
#: widened per input (a parameter or buffer of the model, or a view of one); it records it.
PerChannel = Callable[[Tensor, int], bool]


def _source(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("input", kwargs.get("self"))


def _pointwise(out: Tensor, operands: list[Tensor], lookup_tag: Lookup, name: str,
               per_channel: PerChannel | None = None) -> Tag:
    tags = {lookup_tag(t) for t in operands} - {None}
    if len(tags) != 1:
        return Lost(f"{name} of tensors whose channel blocks lie differently")
    (tag,) = tags
    assert isinstance(tag, Channels)
    src = next(t for t in operands if lookup_tag(t) is not None)
    dim = tag.dim + out.ndim - src.ndim
    if dim < 0 or out.shape[dim] != src.shape[tag.dim]:
        return Lost(f"{name} broadcast the channel axis")
    for t in operands:
        if lookup_tag(t) is None:
            aligned = dim - (out.ndim - t.ndim)
            if aligned < 0 or t.shape[aligned] == 1:
                continue
            if not (per_channel is not None and t.shape[aligned] == src.shape[tag.dim] and tag.outer == tag.inner == 1
                    and per_channel(t, aligned)):
                return Lost(f"{name} with a per-channel operand of shape {tuple(t.shape)}")
    return Channels(dim, tag.outer, tag.inner)


def _reshape(src: Tensor, out: Tensor, tag: Channels, channels: int) -> Tag:
    """Follow the channel block through a row-major reshape."""
    if out.numel() != src.numel():
        return Lost("reshape that changed the element count")
    step = tag.inner * math.prod(src.shape[tag.dim + 1 :])  # flat stride of one channel
    span = step * channels
    stride = 1
    for d in range(out.ndim - 1, -1, -1):
        size = out.shape[d]
        if stride <= step and step % stride == 0 and span <= stride * size and (stride * size) % span == 0:
            return Channels(d, outer=(stride * size) // span, inner=step // stride)
        stride *= size
    return Lost(f"reshape {tuple(src.shape)} -> {tuple(out.shape)} that split the channel axis")


def _probe_dim(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], src: Tensor, dim: int) -> int:
    """Where axis ``dim`` of ``src`` goes under a permutation, found by permuting a meta
    probe of distinct sizes in its place (positional or keyword)."""
    probe = torch.empty(tuple(range(2, src.ndim + 2)), device="meta")
    moved = func(*[probe if a is src else a for a in args], **{k: probe if v is src else v for k, v in kwargs.items()})
    return [s - 2 for s in moved.shape].index(dim)


def _whole(s: slice) -> bool:
    """A slice that takes the whole axis whatever its length (``:``, ``0:``, ``::1``)."""
    return s.start in (None, 0) and s.stop is None and s.step in (None, 1)


def getitem_dim(src: Tensor, index: Any, tag: Channels, strict: bool = False) -> int | None:
    """Output axis of the channel axis after ``src[index]``, or None if it is cut.

    A slice that takes every channel keeps the axis: ``x[:, :x.shape[1]]`` does on the
    inflated input too, ``x[:, :3]`` does not, which the replay of the inflated model finds
    (the slice is 3 channels wide there). ``strict`` keeps only a slice that takes the whole
    axis at any length (``x[:, :]``), for writes, whose outputs the replay cannot see.
    """
    items = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool) for i in items):
        return None
    spread = src.ndim - sum(1 for i in items if i is not None and i is not Ellipsis)
    d_in = d_out = 0
    for item in items:
        if item is None:
            d_out += 1
        elif item is Ellipsis:
            if d_in <= tag.dim < d_in + spread:
                return d_out + tag.dim - d_in
            d_in, d_out = d_in + spread, d_out + spread
        elif isinstance(item, int):
            if d_in == tag.dim:
                return None
            d_in += 1
        else:
            if d_in == tag.dim:
                size = src.shape[d_in]
                return d_out if _whole(item) or not strict and range(size)[item] == range(size) else None
            d_in, d_out = d_in + 1, d_out + 1
    return d_out + tag.dim - d_in


def _dims(value: Any, ndim: int) -> set[int] | None:
    if value is None:
        return None
    values = value if isinstance(value, (tuple, list, torch.Size)) else (value,)
    return {int(v) % ndim for v in values}


def propagate(op: Op | None, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], out: Any,
              lookup_tag: Lookup, channels: int, per_channel: PerChannel | None = None) -> Tag | None:
    """Tag for the tensors in ``out`` of an op that read at least one tagged tensor (None: untagged).

    Args:
        op: the declared op of ``func`` (None: not in :data:`TABLE`).
        func: the torch function that ran.
        args: its positional arguments.
        kwargs: its keyword arguments.
        out: what it returned.
        lookup_tag: the tag of a tensor, or None.
        channels: ``C``, the channel count of one input.
        per_channel: accepts (and records) a per-channel operand that can be widened per
            input; None refuses every per-channel operand.

    Returns:
        The tag for every tensor in ``out``.
    """
    if op is None:
        return Lost(f"{name_of(func)}, an operation inflate does not know", unknown=True)
    name, kind = op.name, op.kind
    src = _source(args, kwargs)
    tag = lookup_tag(src) if isinstance(src, Tensor) else None
    if kind == "data" or kind == "dtype":  # x.to(other): only x's data flows
        return tag
    if kind == "fresh":  # values from nowhere, shaped like the input: its channel block, or nothing
        return tag if isinstance(tag, Channels) else None
    if kind == "new":  # x.new_full(size, v), torch.full(size, v): only a tensor ``v`` carries data
        filled = any(lookup_tag(t) is not None for t in tensors((args[1:], kwargs)))
        return Lost(f"{name} filled with an input-derived value") if filled else None
    operands = tensors((args, kwargs))
    tagged = [t for t in operands if lookup_tag(t) is not None]
    lost = [lookup_tag(t) for t in tagged if isinstance(lookup_tag(t), Lost)]
    if lost:
        return lost[0]
    results = tensors(out)
    if kind == "pointwise" and len(results) == 1:
        return _pointwise(results[0], operands, lookup_tag, name, per_channel)
    if kind == "reduce" and len(args) > 1 and isinstance(args[1], Tensor):  # torch.max(x, y)
        return _pointwise(results[0], operands, lookup_tag, name, per_channel)
    if kind == "channel_norm":
        return _channel_norm(name, args, kwargs, src, tag, lookup_tag, per_channel)
    if kind == "join":
        return _joined(name, args, kwargs, lookup_tag)
    if kind == "copy" and len(results) == 1:
        return _copied(results[0], arg(args, kwargs, 1, "src"), lookup_tag)
    if not isinstance(tag, Channels) or len(tagged) != 1:
        return Lost(f"{name} of the input with other tensors" if tag is not None else f"{name} on the input")
    return _structural(kind, name, func, args, kwargs, src, tag, results, channels)


def _structural(kind: str, name: str, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                src: Tensor, tag: Channels, results: list[Tensor], channels: int) -> Tag:
    """Ops with one tagged operand that move, keep or cut the channel axis."""
    if kind == "spatial":
        ok = tag.dim == 1 and tag.outer == tag.inner == 1 and all(r.shape[1] == src.shape[1] for r in results)
        return tag if ok and all(r.ndim == src.ndim for r in results) else Lost(f"{name} across channels")
    if kind == "pad":
        pad = arg(args, kwargs, 1, "pad")
        return tag if tag.dim < src.ndim - len(pad) // 2 else Lost("pad of the channel axis")
    if kind == "reshape" and len(results) == 1:
        return _reshape(src, results[0], tag, channels)
    if kind == "permute" and len(results) == 1:
        return Channels(_probe_dim(func, args, kwargs, src, tag.dim), tag.outer, tag.inner)
    if kind == "expand" and len(results) == 1:
        dim = tag.dim + results[0].ndim - src.ndim
        return Channels(dim, tag.outer, tag.inner) if results[0].shape[dim] == src.shape[tag.dim] else \
            Lost(f"{name} of the channel axis")
    if kind == "index" and len(results) == 1:
        dim = getitem_dim(src, args[1], tag)
        return Lost("indexing into the channel axis") if dim is None else Channels(dim, tag.outer, tag.inner)
    if kind == "shuffle" and tag.dim == src.ndim - 3:
        factor = arg(args, kwargs, 1, "downscale_factor" if name == "pixel_unshuffle" else "upscale_factor")
        r2 = factor * factor
        if name == "pixel_unshuffle":  # channel c becomes channels c*r*r + i
            return Channels(tag.dim, tag.outer, tag.inner * r2)
        if tag.inner % r2 == 0:
            return Channels(tag.dim, tag.outer, tag.inner // r2)
        return Lost("pixel_shuffle that mixes channels into space")
    if kind == "unfold" and len(results) == 1:
        return _unfolded(func, args, kwargs, src, tag, results[0])
    if kind == "split":
        dim = arg(args, kwargs, 1 if name == "unbind" else 2, "dim", 0) % src.ndim
        if dim == tag.dim:
            return Lost(f"{name} of the channel axis")
        return Channels(tag.dim - (name == "unbind" and dim < tag.dim), tag.outer, tag.inner)
    if kind == "reduce":
        dims = _dims(arg(args, kwargs, 1, "dim"), src.ndim)
        if dims is None or tag.dim in dims:
            return Lost(f"{name} over the channel axis")
        keep = bool(arg(args, kwargs, 2, "keepdim", False))
        return Channels(tag.dim - (0 if keep else sum(d < tag.dim for d in dims)), tag.outer, tag.inner)
    if kind == "along":
        dims = _dims(arg(args, kwargs, 1, "dims" if name == "flip" else "dim"), src.ndim)
        return tag if dims is not None and tag.dim not in dims else Lost(f"{name} along the channel axis")
    if kind == "mixes":
        return Lost(name)
    return Lost(f"{name} on the input")


def _unfolded(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], src: Tensor, tag: Channels,
              out: Tensor) -> Tag:
    """``F.unfold`` (im2col, TNT's pixel embedding): channel ``c`` of ``(B, C, H, W)`` becomes
    channels ``c*K .. c*K+K-1`` of ``(B, C*K, L)``, so the block keeps its place with ``inner``
    times ``K``. ``Tensor.unfold(dim, size, step)``: windows along ``dim`` in a new last axis."""
    if func is torch.Tensor.unfold:
        dim = arg(args, kwargs, 1, "dimension") % src.ndim
        return tag if dim != tag.dim else Lost("unfold along the channel axis")
    if tag.dim != src.ndim - 3 or out.ndim != src.ndim - 1 or out.shape[tag.dim] % src.shape[tag.dim]:
        return Lost("unfold of an axis that is not the channels of (B, C, H, W)")
    return Channels(tag.dim, tag.outer, tag.inner * (out.shape[tag.dim] // src.shape[tag.dim]))


_NORM_OPERANDS = ("running_mean", "running_var", "weight", "bias")


def _channel_norm(name: str, args: Sequence[Any], kwargs: dict[str, Any], src: Any, tag: Tag | None,
                  lookup_tag: Lookup, per_channel: PerChannel | None) -> Tag:
    """``batch_norm``/``instance_norm`` of the input itself: channel-wise when its per-channel
    tensors can be widened per input (each input gets its own copy)."""
    if tag != Channels(1) or per_channel is None:
        return Lost(name)
    for i, key in enumerate(_NORM_OPERANDS, 1):
        t = arg(args, kwargs, i, key)
        if t is None:
            continue
        if not isinstance(t, Tensor) or lookup_tag(t) is not None or t.ndim != 1 or t.shape[0] != src.shape[1] \
                or not per_channel(t, 0):
            return Lost(name)
    return tag


def _joined(name: str, args: Sequence[Any], kwargs: dict[str, Any], lookup_tag: Lookup) -> Tag:
    parts = list(arg(args, kwargs, 0, "tensors"))
    tags = {lookup_tag(t) for t in parts}
    if len(tags) != 1 or not isinstance(next(iter(tags)), Channels):
        return Lost(f"{name} of the input with other tensors")
    (tag,) = tags
    assert isinstance(tag, Channels)
    ndim = parts[0].ndim
    dim = arg(args, kwargs, 1, "dim", 0)
    if name == "stack":
        dim %= ndim + 1
        return Channels(tag.dim + (dim <= tag.dim), tag.outer, tag.inner)
    dim %= ndim
    return tag if dim != tag.dim else Lost(f"{name} along the channel axis")


def _copied(dst: Tensor, src: Any, lookup_tag: Lookup) -> Tag:
    """Tag of ``dst`` after ``dst.copy_(src)``: ``src`` broadcast to ``dst``'s shape."""
    src_tag = lookup_tag(src) if isinstance(src, Tensor) else None
    if isinstance(src_tag, Lost):
        return src_tag
    if isinstance(src_tag, Channels):
        dim = src_tag.dim + dst.ndim - src.ndim
        return Channels(dim, src_tag.outer, src_tag.inner) if dst.shape[dim] == src.shape[src_tag.dim] else \
            Lost("copy_ that broadcast the channel axis")
    tag = lookup_tag(dst)
    if not isinstance(tag, Channels):
        return tag if tag is not None else Lost("copy_ on the input")
    aligned = tag.dim - (dst.ndim - src.ndim) if isinstance(src, Tensor) else -1
    return tag if aligned < 0 or src.shape[aligned] == 1 else \
        Lost(f"copy_ of a per-channel value of shape {tuple(src.shape)}")


def setitem_tag(target: Tensor, index: Any, value: Any, lookup_tag: Lookup) -> Tag | None:
    """Tag of ``target`` after ``target[index] = value``, where either is tagged."""
    tag, value_tag = lookup_tag(target), lookup_tag(value) if isinstance(value, Tensor) else None
    if isinstance(tag, Lost):
        return tag
    if isinstance(value_tag, Lost):
        return value_tag
    if tag is None:
        return Lost("__setitem__ of the input into another tensor")
    dim = getitem_dim(target, index, tag, strict=True)
    if dim is None:
        return Lost("__setitem__ into some channels of the input")
    if not isinstance(value, Tensor):
        return tag
    view = torch.empty(target.shape, device="meta")[index]
    aligned = dim - (view.ndim - value.ndim)
    if value_tag is None:
        return tag if aligned < 0 or value.shape[aligned] == 1 else \
            Lost(f"__setitem__ of a per-channel value of shape {tuple(value.shape)}")
    if value_tag == Channels(aligned, tag.outer, tag.inner):
        return tag
    return Lost("__setitem__ of the input into itself with its channels elsewhere")
