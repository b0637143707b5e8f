"""The op table: what each torch operation does to the channel axis of the model input.

:data:`TABLE` declares each operation once, keyed by the function object a
:class:`~torch.overrides.TorchFunctionMode` receives (``torch.add``, ``Tensor.add``,
``Tensor.__add__`` and ``Tensor.add_`` are four keys of one declaration), with its *kind*:
what it does to the channel axis. The rules of each kind are in :mod:`inflate._tags`; an
operation the table does not know is reported as unknown. Keyword forms are read through
:func:`arg`; :func:`tensors` and :func:`atoms` walk an operation's arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Op", "TABLE", "CONSUMERS", "lookup", "name_of", "tensors", "atoms", "arg"]


@dataclass(frozen=True)
class Op:
    """One declared operation: its ``kind`` (what it does to the channel axis) and name."""

    kind: str
    name: str


#: Kinds, and the names declared for each. Every name is looked up in ``torch``,
#: ``Tensor``, ``torch.nn.functional`` and ``torch._C._nn``; ``Tensor`` dunder forms
#: (``__add__``, ``__radd__``, ``__iadd__``) and in-place forms (``add_``) join their op.
_KINDS: dict[str, str] = {
    # each element from the same element (and channel-free operands): the tag is kept
    "pointwise": """relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu selu celu
        mish softplus softsign tanhshrink hardshrink softshrink threshold rrelu logsigmoid abs neg negative exp
        exp2 expm1 log log2 log10 log1p sqrt rsqrt square sin cos tan asin acos atan sinh cosh erf erfc
        clamp clip clamp_min clamp_max floor ceil round trunc frac sign reciprocal pow nan_to_num contiguous
        clone detach float double half bfloat16 requires_grad_ add sub subtract mul multiply div divide
        true_divide floor_divide remainder fmod rsub maximum minimum fmax fmin where lerp addcmul addcdiv
        eq ne lt le gt ge logical_not logical_and logical_or bitwise_not isnan isinf isfinite masked_fill
        dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout fill zero""",
    "copy": "copy",  # dst.copy_(src): dst holds src, broadcast
    "dtype": "to type type_as",  # other tensor operands describe only the dtype or device
    "fresh": "zeros_like ones_like empty_like full_like rand_like randn_like randint_like",  # shaped like it
    # sizes from Python: no data flows (a blank the input may later be copied into)
    "new": "new_zeros new_ones new_empty new_full new_tensor zeros ones empty full",
    "spatial": """max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
        max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
        adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
        adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices
        lp_pool1d lp_pool2d lp_pool3d interpolate upsample upsample_nearest upsample_bilinear grid_sample""",
    "pad": "pad",
    "reshape": "reshape view flatten unflatten squeeze unsqueeze view_as reshape_as ravel",
    "permute": "permute transpose swapaxes swapdims movedim moveaxis t T mT adjoint",
    "expand": "expand expand_as broadcast_to",
    "index": "__getitem__",
    "setitem": "__setitem__",
    "split": "split chunk tensor_split unbind",
    "join": "cat concat concatenate stack",
    "reduce": "sum mean nansum nanmean amax amin max min prod std var norm logsumexp any all argmax argmin median",
    "along": "softmax log_softmax cumsum cumprod flip",
    "shuffle": "pixel_shuffle pixel_unshuffle",
    "unfold": "unfold",  # F.unfold (im2col): each channel becomes K = kh*kw channels; Tensor.unfold: a window axis
    # known to combine the channels of one position (or to be channel-specific)
    # each channel normalised with its own statistics and its own affine: kept, the per-channel
    # tensors (running statistics, weight, bias) widened per input
    "channel_norm": "batch_norm instance_norm",
    "mixes": """layer_norm group_norm local_response_norm rms_norm normalize matmul mm
        bmm einsum baddbmm addmm scaled_dot_product_attention embedding""",
    # weight layers that may read the input
    "conv1d": "conv1d", "conv2d": "conv2d", "conv3d": "conv3d",
    "conv_transpose1d": "conv_transpose1d", "conv_transpose2d": "conv_transpose2d",
    "conv_transpose3d": "conv_transpose3d", "linear": "linear",
    # values into Python: a decision or a number that inflation would change
    "escape": "item tolist __bool__ __int__ __float__ __index__ __complex__ numpy __array__",
    # sizes into Python
    "size": "shape size stride numel nelement __len__ storage_offset",
    # nothing read: metadata only
    "meta": "dim ndim ndimension dtype device is_floating_point is_complex layout is_cuda is_meta requires_grad "
            "data_ptr is_contiguous grad_fn __torch_function__",
    "data": "data",  # the tensor itself
}

#: Weight layers that may read the input: kind -> (layout kind, spatial dims).
CONSUMERS: dict[str, tuple[str, int]] = {
    "conv1d": ("conv", 1), "conv2d": ("conv", 2), "conv3d": ("conv", 3),
    "conv_transpose1d": ("transposed", 1), "conv_transpose2d": ("transposed", 2),
    "conv_transpose3d": ("transposed", 3), "linear": ("linear", 0),
}

_DUNDER = {"add": ("__add__", "__radd__", "__iadd__"), "sub": ("__sub__", "__rsub__", "__isub__"),
           "mul": ("__mul__", "__rmul__", "__imul__"), "div": ("__truediv__", "__rtruediv__", "__itruediv__",
                                                               "__div__", "__rdiv__", "__idiv__"),
           "floor_divide": ("__floordiv__", "__rfloordiv__", "__ifloordiv__"),
           "remainder": ("__mod__", "__rmod__", "__imod__"), "pow": ("__pow__", "__rpow__", "__ipow__"),
           "neg": ("__neg__",), "abs": ("__abs__",), "eq": ("__eq__",), "ne": ("__ne__",), "lt": ("__lt__",),
           "le": ("__le__",), "gt": ("__gt__",), "ge": ("__ge__",), "bitwise_not": ("__invert__",),
           "logical_and": ("__and__", "__rand__", "__iand__"), "logical_or": ("__or__", "__ror__", "__ior__")}
_NAMESPACES = (torch, Tensor, F, torch._C._nn, torch._C._TensorBase)


def _build() -> dict[Any, Op]:
    table: dict[Any, Op] = {}
    for kind, names in _KINDS.items():
        for name in names.split():
            for alias in (name, name + "_", *_DUNDER.get(name, ())):
                for space in _NAMESPACES:
                    func = space.__dict__.get(alias) if isinstance(space, type) else getattr(space, alias, None)
                    if func is not None:
                        table.setdefault(func, Op(kind, name))
    return table


#: function object -> :class:`Op`. Attribute reads (``x.shape``, ``x.T``) arrive as the
#: descriptor's ``__get__``: they are keyed by the descriptor.
TABLE: dict[Any, Op] = _build()


def lookup(func: Callable[..., Any]) -> Op | None:
    """The declared :class:`Op` of ``func``, or None.

    Example:
        >>> lookup(torch.Tensor.__iadd__), lookup(torch.transpose).kind
        (Op(kind='pointwise', name='add'), 'permute')
        >>> lookup(torch.Tensor.shape.__get__).kind
        'size'
    """
    op = TABLE.get(func)
    if op is None and getattr(func, "__name__", "") == "__get__":
        op = TABLE.get(getattr(func, "__self__", None))
    return op


def name_of(func: Callable[..., Any]) -> str:
    """A readable name: ``Tensor.add_``, ``conv2d``, ``Tensor.shape``."""
    if getattr(func, "__name__", "") == "__get__" and hasattr(func, "__self__"):
        return f"Tensor.{func.__self__.__name__}"
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    qual = qual.replace("_VariableFunctionsClass.", "torch.").replace("_TensorBase.", "Tensor.")
    return qual.replace("TensorBase.", "Tensor.")


_ATOMS = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device, slice, type(Ellipsis),
                    torch.memory_format, torch.layout, complex))


def tensors(tree: Any) -> list[Tensor]:
    """The tensors in ``tree``, in pytree order (plain tuples, lists and dicts walked
    directly, anything else through ``torch.utils._pytree``)."""
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
                found.extend(tensors(item))
        return found
    if kind is dict:
        return tensors(list(tree.values()))
    leaves = torch.utils._pytree.tree_leaves(tree)
    if len(leaves) != 1 or leaves[0] is not tree:
        return [t for t in leaves if isinstance(t, Tensor)]
    # a container pytree does not know: model outputs such as diffusers' BaseOutput
    if isinstance(tree, Mapping):
        return tensors(list(tree.values()))
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return tensors([getattr(tree, f.name) for f in dataclasses.fields(tree)])
    return []


def atoms(tree: Any) -> list[Any]:
    """The leaves of ``tree`` that are not tensors (Python numbers, sizes, slices, ...),
    with slices opened into their ``start, stop, step`` (plain tuples, lists and dicts
    walked directly, anything else through ``torch.utils._pytree``).

    Example:
        >>> atoms(((torch.zeros(1), 2, slice(None, 3)), {"dim": 1}))
        [2, None, 3, None, 1]
    """
    out: list[Any] = []
    _atoms_into(tree, out)
    return out


def _atoms_into(tree: Any, out: list[Any]) -> None:
    kind = type(tree)
    if kind is tuple or kind is list or kind is torch.Size:
        for item in tree:
            _atoms_into(item, out)
    elif kind is dict:
        for item in tree.values():
            _atoms_into(item, out)
    elif kind is slice:
        out.extend((tree.start, tree.stop, tree.step))
    elif kind in _ATOMS:
        out.append(tree)
    elif not isinstance(tree, Tensor):
        leaves = torch.utils._pytree.tree_leaves(tree)
        if len(leaves) == 1 and leaves[0] is tree:
            out.append(tree)
        else:
            for leaf in leaves:
                _atoms_into(leaf, out)


def arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, given positionally or as keyword ``name``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)
