"""How the channel axis of the model input moves through tensor operations.

A tensor derived from the model input carries a :class:`Channels` tag while
every operation so far treated all input channels alike and kept them apart
(elementwise maths with channel-free operands, padding, pooling, resizing,
reshapes and permutations that keep the channel block whole). Anything else
turns the tag into a :class:`Lost` tag that remembers the operation: a layer
that later reads such a tensor cannot be inflated exactly.

This module only decides tags; :mod:`inflate._discovery` runs the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["Channels", "Lost", "Tag", "CONSUMERS", "propagate"]


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
    """The channel structure was lost; ``why`` names the operation."""

    why: str


Tag = Union[Channels, Lost]

#: Weight layers that may read the input: name -> (kind, spatial dims).
CONSUMERS: dict[str, tuple[str, int]] = {
    "conv1d": ("conv", 1),
    "conv2d": ("conv", 2),
    "conv3d": ("conv", 3),
    "conv_transpose1d": ("transposed", 1),
    "conv_transpose2d": ("transposed", 2),
    "conv_transpose3d": ("transposed", 3),
    "linear": ("linear", 0),
}

_POINTWISE = set(
    """relu relu_ relu6 gelu silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid
    hardsigmoid_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu mish softplus abs neg exp
    log log1p sqrt rsqrt square sin cos clamp clamp_ clip clamp_min clamp_max floor ceil round sign
    reciprocal pow __pow__ nan_to_num contiguous clone detach float double half bfloat16 to type
    type_as dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout requires_grad_
    __neg__ __abs__ add add_ sub sub_ mul mul_ div div_ true_divide __add__ __radd__ __iadd__ __sub__
    __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __div__
    maximum minimum where lerp identity""".split()
)
# Ops whose tensor operands other than the first describe only dtype or device.
_DTYPE_ONLY = {"to", "type_as"}
_SPATIAL = set(
    """max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
    adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d lp_pool1d lp_pool2d
    lp_pool3d interpolate upsample upsample_nearest upsample_bilinear grid_sample""".split()
)
_RESHAPE = set("reshape view flatten unflatten squeeze squeeze_ unsqueeze unsqueeze_ view_as reshape_as".split())
_PERMUTE = set("permute transpose transpose_ swapaxes swapdims movedim moveaxis t".split())
_SPLIT = {"split", "chunk", "tensor_split"}
# Ops that only read the shape, dtype or device of the input.
_FRESH = set(
    """zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros new_ones
    new_empty new_full new_tensor""".split()
)

Lookup = Callable[[Tensor], Union[Tag, None]]


_ATOMS = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device, slice, type(Ellipsis),
                    torch.memory_format))


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors in ``tree``, in pytree order (plain tuples, lists and dicts walked
    directly, which is most of every trace; anything else through ``torch.utils._pytree``)."""
    if isinstance(tree, Tensor):
        return [tree]
    kind = type(tree)
    if kind in _ATOMS:
        return []
    if kind is tuple or kind is list:
        found: list[Tensor] = []
        for item in tree:
            if isinstance(item, Tensor):
                found.append(item)
            elif type(item) not in _ATOMS:
                found.extend(_tensors(item))
        return found
    if kind is dict:
        return _tensors(list(tree.values()))
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, Tensor)]


def _first_tensor_arg(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("input", kwargs.get("self"))


def _pointwise(out: Tensor, operands: list[Tensor], lookup: Lookup, name: str) -> Tag:
    tags = {lookup(t) for t in operands} - {None}
    if len(tags) != 1:
        return Lost(f"{name} of tensors with different channel layouts")
    (tag,) = tags
    assert isinstance(tag, Channels)
    src = next(t for t in operands if lookup(t) is not None)
    dim = tag.dim + out.ndim - src.ndim
    if out.shape[dim] != src.shape[tag.dim]:
        return Lost(f"{name} broadcast the channel axis")
    for t in operands:
        if lookup(t) is None:
            aligned = dim - (out.ndim - t.ndim)
            if aligned >= 0 and t.shape[aligned] != 1:
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


def _permuted_dim(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], src: Tensor, dim: int) -> int:
    """Where axis ``dim`` of ``src`` goes, found by permuting a probe of distinct sizes."""
    probe = torch.empty(tuple(range(2, src.ndim + 2)), device="meta")
    swapped = [probe if a is src else a for a in args]
    moved = func(*swapped, **kwargs)
    return [s - 2 for s in moved.shape].index(dim)


def _getitem_dim(src: Tensor, index: Any, tag: Channels) -> int | None:
    """Output axis of the channel axis after ``src[index]``, or None if it is cut."""
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
                whole = range(src.shape[d_in])[item] == range(src.shape[d_in])
                return d_out if whole else None
            d_in, d_out = d_in + 1, d_out + 1
    return d_out + tag.dim - d_in


def propagate(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], out: Any, lookup: Lookup, channels: int
) -> Tag | None:
    """Tag for the tensors in ``out`` of an op that read at least one tagged tensor (None: untagged).

    Args:
        func: the torch function that ran.
        args: its positional arguments.
        kwargs: its keyword arguments.
        out: what it returned.
        lookup: the tag of a tensor, or None.
        channels: ``C``, the channel count of one input.

    Returns:
        The tag for every tensor in ``out``.
    """
    name = getattr(func, "__name__", repr(func))
    operands = _tensors((args, kwargs))
    tagged = [t for t in operands if lookup(t) is not None]
    lost = [lookup(t) for t in tagged if isinstance(lookup(t), Lost)]
    if lost:
        return lost[0]  # type: ignore[return-value]
    src = _first_tensor_arg(args, kwargs)
    tag = lookup(src) if isinstance(src, Tensor) else None
    results = _tensors(out)
    if name in _DTYPE_ONLY:  # x.to(other) / x.type_as(other): only x's data flows
        return tag
    if name in _POINTWISE and len(results) == 1:
        return _pointwise(results[0], operands, lookup, name)
    if not isinstance(tag, Channels) or len(tagged) != 1:
        if name in ("cat", "concat", "concatenate", "stack") and args:
            return _joined(name, args, kwargs, results, lookup)
        return Lost(f"{name} on the input")
    if name in _SPATIAL:
        ok = tag.dim == 1 and tag.outer == tag.inner == 1 and all(r.shape[1] == src.shape[1] for r in results)
        return tag if ok and all(r.ndim == src.ndim for r in results) else Lost(f"{name} across channels")
    if name == "pad":
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        return tag if tag.dim < src.ndim - len(pad) // 2 else Lost("pad of the channel axis")
    if name in _RESHAPE and len(results) == 1:
        return _reshape(src, results[0], tag, channels)
    if name in _PERMUTE and len(results) == 1:
        return Channels(_permuted_dim(func, args, kwargs, src, tag.dim), tag.outer, tag.inner)
    if name == "__getitem__" and len(results) == 1:
        dim = _getitem_dim(src, args[1], tag)
        return Lost("indexing into the channel axis") if dim is None else Channels(dim, tag.outer, tag.inner)
    if name in ("pixel_unshuffle", "pixel_shuffle") and tag.dim == src.ndim - 3:
        r2 = (args[1] if len(args) > 1 else kwargs.get("downscale_factor", kwargs.get("upscale_factor"))) ** 2
        if name == "pixel_unshuffle":  # channel c becomes channels c*r*r + i
            return Channels(tag.dim, tag.outer, tag.inner * r2)
        if tag.inner % r2 == 0:
            return Channels(tag.dim, tag.outer, tag.inner // r2)
        return Lost("pixel_shuffle that mixes channels into space")
    if name in _SPLIT:
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) % src.ndim
        return tag if dim != tag.dim else Lost(f"{name} of the channel axis")
    return Lost(f"{name} on the input")


def _joined(name: str, args: Sequence[Any], kwargs: dict[str, Any], results: list[Tensor], lookup: Lookup) -> Tag:
    parts = list(args[0])
    tags = {lookup(t) for t in parts}
    if len(tags) != 1 or not isinstance(next(iter(tags)), Channels):
        return Lost(f"{name} of the input with other tensors")
    (tag,) = tags
    assert isinstance(tag, Channels)
    ndim = parts[0].ndim
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if name == "stack":
        dim %= ndim + 1
        return Channels(tag.dim + (dim <= tag.dim), tag.outer, tag.inner)
    dim %= ndim
    return tag if dim != tag.dim else Lost(f"{name} along the channel axis")


def is_fresh(func: Callable[..., Any]) -> bool:
    """Whether ``func`` makes a new tensor from the input's shape alone."""
    return getattr(func, "__name__", "") in _FRESH
