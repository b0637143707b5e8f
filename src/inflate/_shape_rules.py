"""The shape rules: one per kind of operation (see :mod:`inflate._shapes`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._layouts import (CHANNELS_LAST, MISSING, Rule, arg, as_tuple, dense, empty_meta, is_channels_last,
                      like_layout, meta_float, same_layout)

__all__ = ["build"]


def _same(inplace_at: int | None = None, inplace: bool = False) -> Rule:
    """Output like the input (same shape, dtype, strides); the input itself when in place
    (always, or when the argument at ``inplace_at`` / ``inplace=`` is true)."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        x = arg(args, kwargs, 0, "input")
        if not meta_float(x) or not dense(x):
            return MISSING
        flag = inplace or (inplace_at is not None and arg(args, kwargs, inplace_at, "inplace", False))
        if isinstance(flag, Tensor):
            return MISSING
        return x if flag else same_layout(x)

    return rule


def _per_channel(x: Tensor, *params: Any) -> bool:
    """Each of ``params`` is None or a vector of ``x``'s channel count (``x.shape[1]``)."""
    channels = (x.shape[1],)
    for p in params:
        if p is not None and p.shape != channels:
            return False
    return True


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias")


def _batch_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if len(args) == 3:  # how nn.BatchNorm*d calls it: the rest by keyword
        x, mean, var = args
        params = [mean, var, kwargs.get("weight"), kwargs.get("bias")]
        training = kwargs.get("training", False)
    else:
        x, *params = (arg(args, kwargs, i, n) for i, n in enumerate(_BATCH_NORM_ARGS))
        training = arg(args, kwargs, 5, "training", False)
    if not meta_float(x, *params) or x.ndim < 2 or not dense(x) or not _per_channel(x, *params):
        return MISSING
    if training is not False and (not isinstance(training, bool) or x.numel() == x.shape[1]):
        return MISSING  # one value per channel: PyTorch raises, let it
    return same_layout(x)


def _group_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    x, groups = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "num_groups")
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    if not meta_float(x, weight, bias) or x.ndim < 2 or not dense(x) or not _per_channel(x, weight, bias):
        return MISSING
    if type(groups) is not int or groups < 1 or x.shape[1] % groups or x.numel() // groups == 1:
        return MISSING  # (the last: one value per group, which PyTorch refuses)
    return empty_meta(x.shape, x)  # contiguous, whatever the input's layout


def _layer_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    x, normalized = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    if not meta_float(x, weight, bias):
        return MISSING
    normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    n = len(normalized)
    if not n or n > x.ndim or x.shape[-n:] != normalized:
        return MISSING
    if (weight is not None and weight.shape != normalized) or (bias is not None and bias.shape != normalized):
        return MISSING
    return empty_meta(x.shape, x)


def _linear(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if len(args) == 3 and not kwargs:  # how nn.Linear calls it
        x, weight, bias = args
    else:
        x, weight, bias = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not meta_float(x, weight, bias):
        return MISSING
    shape, rows = x.shape, weight.shape
    if len(rows) != 2 or not shape or shape[-1] != rows[1]:
        return MISSING
    if bias is not None and bias.shape != (rows[0],) and bias.ndim != 0:
        return MISSING
    return empty_meta((*shape[:-1], rows[0]), x)


_CONV_ARGS = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
              ("groups", 1))


def _conv(dims: int) -> Rule:
    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if len(args) == 7 and not kwargs:  # how nn.Conv*d calls it
            x, weight, bias, stride, padding, dilation, groups = args
        else:
            x, weight, bias, stride, padding, dilation, groups = (
                arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(_CONV_ARGS))
        if not meta_float(x, weight, bias):
            return MISSING
        shape, kernel = x.shape, weight.shape
        if len(shape) != dims + 2 or len(kernel) != dims + 2 or not (dense(x) and dense(weight)):
            return MISSING
        stride, dilation = as_tuple(stride, dims), as_tuple(dilation, dims)
        if stride is None or dilation is None or type(groups) is not int or groups < 1:
            return MISSING
        if shape[1] != kernel[1] * groups or kernel[0] % groups:
            return MISSING
        if bias is not None and bias.shape != (kernel[0],):
            return MISSING
        if padding == "same":
            spatial = list(shape[2:])
            if 0 in spatial:
                return MISSING
        else:
            pad = (0,) * dims if padding == "valid" else as_tuple(padding, dims)
            if pad is None:
                return MISSING
            spatial = []
            for i in range(dims):  # a plain loop: every conv of a trace comes here
                size = (shape[i + 2] + 2 * pad[i] - dilation[i] * (kernel[i + 2] - 1) - 1) // stride[i] + 1
                if size <= 0:
                    return MISSING
                spatial.append(size)
        return empty_meta((shape[0], kernel[0], *spatial), x)

    return rule


def _adaptive_avg_pool(dims: int) -> Rule:
    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        x, size = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "output_size")
        if not meta_float(x) or x.ndim not in (dims + 1, dims + 2) or any(s == 0 for s in x.shape[-dims:]):
            return MISSING
        sizes = (size,) * dims if isinstance(size, int) or size is None else tuple(size)
        if len(sizes) != dims or not all(s is None or (type(s) is int and s > 0) for s in sizes):
            return MISSING
        shape = (*x.shape[:-dims], *(x.shape[-dims + i] if s is None else s for i, s in enumerate(sizes)))
        return like_layout(x, shape)

    return rule


def _pool(dims: int, max_pool: bool) -> Rule:
    names = ("input", "kernel_size", "stride", "padding") + (("dilation", "ceil_mode", "return_indices")
                                                             if max_pool else ("ceil_mode",))

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        x, kernel, stride, padding, *rest = (arg(args, kwargs, i, n) for i, n in enumerate(names))
        dilation, ceil_mode = (rest[0] or 1, rest[1] or False) if max_pool else (1, rest[0] or False)
        if (max_pool and rest[2]) or not meta_float(x) or x.ndim not in (dims + 1, dims + 2):
            return MISSING
        kernel, dilation = as_tuple(kernel, dims), as_tuple(dilation, dims)
        stride, padding = (kernel if stride in (None, [], ()) else as_tuple(stride, dims)), as_tuple(padding or 0, dims)
        if None in (kernel, stride, padding, dilation) or not isinstance(ceil_mode, bool):
            return MISSING
        spatial = []
        for size, k, s, p, d in zip(x.shape[-dims:], kernel, stride, padding, dilation):
            if k < 1 or s < 1 or d < 1 or p < 0 or p > k // 2:
                return MISSING
            out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
            if ceil_mode and (out - 1) * s >= size + p:
                out -= 1
            if out < 1:
                return MISSING
            spatial.append(out)
        return like_layout(x, (*x.shape[:-dims], *spatial))

    return rule


def _attention(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    q, k, v = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(args, kwargs, 3, "attn_mask")
    if mask is not None or kwargs.get("enable_gqa") or not meta_float(q, k, v):
        return MISSING
    if not (q.ndim == k.ndim == v.ndim >= 2 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
            and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]):
        return MISSING
    return empty_meta((*q.shape[:-1], v.shape[-1]), q)


def _matmul(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other")
    if kwargs or not meta_float(a, b) or a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        return MISSING
    if a.shape[:-2] != b.shape[:-2]:
        return MISSING
    return empty_meta((*a.shape[:-1], b.shape[-1]), a)


def _mean(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    x = arg(args, kwargs, 0, "input")
    dim, keepdim = arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "keepdim", False)
    if set(kwargs) - {"dim", "keepdim"} or not meta_float(x) or x.ndim == 0 or not isinstance(keepdim, bool):
        return MISSING
    dims = (dim,) if isinstance(dim, int) else dim
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return MISSING
    if any(not -x.ndim <= d < x.ndim for d in dims):
        return MISSING
    reduced = {d % x.ndim for d in dims}
    if len(reduced) != len(dims):
        return MISSING
    shape = [1 if d in reduced else s for d, s in enumerate(x.shape)] if keepdim else \
        [s for d, s in enumerate(x.shape) if d not in reduced]
    return empty_meta(shape, x)


def _dropout(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    x, p = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "p", 0.5)
    training, inplace = arg(args, kwargs, 2, "training", True), arg(args, kwargs, 3, "inplace", False)
    if not meta_float(x) or type(p) not in (int, float) or not 0 <= p <= 1:
        return MISSING  # (a p out of range: PyTorch raises, let it)
    if type(training) is not bool or type(inplace) is not bool:
        return MISSING
    if not training or p == 0 or inplace:
        return x  # no dropout, or in place: the input itself
    return same_layout(x) if dense(x) else MISSING


def _cat(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    tensors, dim = arg(args, kwargs, 0, "tensors"), arg(args, kwargs, 1, "dim", 0)
    if set(kwargs) - {"tensors", "dim"} or type(tensors) not in (tuple, list) or not tensors or type(dim) is not int:
        return MISSING
    first = tensors[0]
    if not meta_float(*tensors):
        return MISSING
    ndim = first.ndim
    if ndim == 0 or not -ndim <= dim < ndim:
        return MISSING
    dim %= ndim
    shape = list(first.shape)
    for t in tensors[1:]:
        other = t.shape
        if len(other) != ndim or any(other[d] != shape[d] for d in range(ndim) if d != dim):
            return MISSING
        shape[dim] += other[dim]
    if ndim in CHANNELS_LAST and not all(t.is_contiguous() and not is_channels_last(t) for t in tensors):
        return MISSING  # 4-D and 5-D outputs follow the inputs' memory format
    return empty_meta(shape, first)  # other ranks: always contiguous


def _viewable(shape: Sequence[int], stride: Sequence[int], new: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` and ``stride`` can be viewed as ``new`` (ATen's
    ``computeStride``: every run of axes merged or split must be contiguous in itself)."""
    view_d, base = len(new) - 1, stride[-1]
    tensor_numel = view_numel = 1
    for d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and stride[d - 1] != tensor_numel * base):
            while view_d >= 0 and (view_numel < tensor_numel or new[view_d] == 1):
                view_numel *= new[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return False
            if d > 0:
                base, tensor_numel, view_numel = stride[d - 1], 1, 1
    return view_d == -1


def _reshape(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Only the copying case (a non-contiguous tensor that no view can reshape), whose
    meta path runs Python: a new contiguous tensor. Views are left to PyTorch (quick)."""
    if kwargs or len(args) < 2 or not isinstance(args[0], Tensor):
        return MISSING
    x = args[0]
    new = args[1] if len(args) == 2 and type(args[1]) in (tuple, list, torch.Size) else args[1:]
    if not x.is_meta or x.ndim == 0 or x.is_contiguous() or not all(type(n) is int for n in new):
        return MISSING
    numel, known = x.numel(), 1
    for n in new:
        if n != -1:
            known *= n
    if numel == 0 or known == 0 or any(n < -1 for n in new):
        return MISSING
    if -1 in new:
        if list(new).count(-1) > 1 or numel % known:
            return MISSING
        new = [numel // known if n == -1 else n for n in new]
    elif known != numel:
        return MISSING
    if _viewable(x.shape, x.stride(), new):
        return MISSING
    return empty_meta(new, x)


def _broadcasts_into(small: Tensor, big: Tensor) -> bool:
    """``small`` broadcasts to ``big``'s shape (every axis of ``small`` is 1 or ``big``'s)."""
    return small.ndim <= big.ndim and all(s in (1, b) for s, b in zip(small.shape[::-1], big.shape[::-1]))


def _binary(inplace: bool) -> Rule:
    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if len(args) != 2 or set(kwargs) - {"alpha"}:
            return MISSING
        a, b = args
        if not isinstance(a, Tensor) or not a.is_meta:
            return MISSING
        if isinstance(b, Tensor):
            if not meta_float(a, b):
                return MISSING
            if a.shape != b.shape and not _broadcasts_into(b, a):
                if inplace or not dense(b) or not _broadcasts_into(a, b):
                    return MISSING
                # a broadcast into b's shape: the output follows a's order of its own axes
                # longer than 1, then b's. With at most one such axis in a, that is b's layout.
                if sum(size > 1 for size in a.shape) <= 1:
                    return same_layout(b)
                return empty_meta(b.shape, b) if a.is_contiguous() and b.is_contiguous() else MISSING
        elif type(b) is int and inplace and not a.is_floating_point() and not a.is_complex() and a.dtype != torch.bool:
            return a  # e.g. a batch norm's num_batches_tracked += 1
        elif type(b) not in (int, float) or not meta_float(a):
            return MISSING
        if inplace:
            return a
        return same_layout(a) if dense(a) else MISSING

    return rule


def build() -> dict[Any, Rule]:
    """The table of :data:`inflate._shapes.RULES`: function -> rule."""
    T = torch.Tensor
    at1, unary, inplace = _same(inplace_at=1), _same(), _same(inplace=True)
    rules: dict[Any, Rule] = {
        F.batch_norm: _batch_norm,
        F.group_norm: _group_norm,
        F.layer_norm: _layer_norm,
        F.linear: _linear,
        F.scaled_dot_product_attention: _attention,
        torch.conv1d: _conv(1),
        torch.conv2d: _conv(2),
        torch.conv3d: _conv(3),
        F.adaptive_avg_pool1d: _adaptive_avg_pool(1),
        F.adaptive_avg_pool2d: _adaptive_avg_pool(2),
        F.adaptive_avg_pool3d: _adaptive_avg_pool(3),
        F.max_pool1d: _pool(1, max_pool=True),
        F.max_pool2d: _pool(2, max_pool=True),
        F.max_pool3d: _pool(3, max_pool=True),
        F.avg_pool1d: _pool(1, max_pool=False),
        F.avg_pool2d: _pool(2, max_pool=False),
        F.avg_pool3d: _pool(3, max_pool=False),
        T.matmul: _matmul,
        torch.matmul: _matmul,
        T.mean: _mean,
        torch.mean: _mean,
        F.dropout: _dropout,
        torch.cat: _cat,
        T.reshape: _reshape,
        torch.reshape: _reshape,
        F.hardtanh: _same(inplace_at=3),
        F.leaky_relu: _same(inplace_at=2),
        F.elu: _same(inplace_at=2),
    }
    rules.update(dict.fromkeys((F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.mish), at1))
    rules.update(dict.fromkeys((F.gelu, torch.sigmoid, torch.tanh, torch.relu, T.sigmoid, T.tanh, T.relu), unary))
    rules.update(dict.fromkeys((torch.sigmoid_, torch.relu_, torch.tanh_, T.sigmoid_, T.relu_, T.tanh_), inplace))
    binary, binary_ = _binary(inplace=False), _binary(inplace=True)
    for op in ("add", "sub", "mul", "div"):
        rules[getattr(T, op)] = rules[getattr(torch, op)] = binary
        rules[getattr(T, op + "_")] = binary_
    return rules
