"""Outputs of the commonest operations on meta tensors, without running PyTorch's meta kernels.

On the meta device PyTorch still works out each output's shape, dtype and
strides, for many operations in Python reference code (``torch._refs``,
``torch._decomp``): a ``batch_norm`` costs about 0.9 ms, a ``layer_norm`` 1.3 ms,
an attention 1.6 ms. That is almost all of a discovery trace. For the
operations that dominate real networks the answer is simple, and
:func:`shortcut` gives it directly:

* normalizations and activations keep the input's shape, dtype and strides
  (layer and group norm: contiguous);
* ``linear``, ``conv``, attention, ``mean`` over dims, ``matmul``: the usual
  shape formulas, contiguous (on meta even a channels-last conv gives a contiguous
  output); pooling keeps a contiguous or channels-last layout;
* ``add``/``sub``/``mul``/``div`` of same-dtype tensors (with broadcasting when
  one operand already has the full shape: the output takes its strides) or of a
  float tensor and a Python number;
* ``dropout`` (the input itself when it does nothing or works in place), ``cat``
  (contiguous), and a ``reshape`` that no view can make (a contiguous copy).

A rule applies only to the plain case it is sure of: floating meta tensors of
one dtype, contiguous (or, for the stride-keeping ones, dense) operands, no
``out=``. Otherwise it returns :data:`MISSING` and the caller runs the real op.
``tests/test_shapes.py`` checks every rule against PyTorch's own meta kernels.
The rules themselves are in :mod:`inflate._shape_rules`, the layout helpers they
share in :mod:`inflate._layouts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._layouts import MISSING, Rule, meta_like
from ._shape_rules import build

__all__ = ["MISSING", "RULES", "Mismatch", "shortcut", "check", "meta_like"]

#: When true, the tracer also runs each shortcut op for real and :func:`check` compares (tests set it).
CHECK = False

#: function -> rule; a rule returns the output, or :data:`MISSING` when it does not apply.
RULES: dict[Any, Rule] = build()


def shortcut(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The output ``func(*args, **kwargs)`` would give on meta tensors, or :data:`MISSING`.

    Example:
        >>> x = torch.empty(2, 3, 8, 8, device="meta")
        >>> shortcut(F.batch_norm, (x, None, None), {"training": True}).shape
        torch.Size([2, 3, 8, 8])
        >>> shortcut(torch.Tensor.add, (x, "not a tensor"), {}) is MISSING
        True
    """
    rule = RULES.get(func)
    return MISSING if rule is None else rule(args, kwargs)


class Mismatch(AssertionError):
    """A shortcut disagreed with PyTorch (raised by :func:`check`): a bug in a rule."""


def _layout(t: Tensor) -> tuple[Any, ...]:
    """Shape, dtype, device and the strides that matter (those of axes longer than 1)."""
    return tuple(t.shape), t.dtype, t.device, tuple(st for size, st in zip(t.shape, t.stride()) if size > 1)


def check(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> None:
    """Raise :class:`Mismatch` unless ``out`` is laid out like what ``func`` itself returns.

    Compared: shape, dtype, device, the strides of axes longer than 1, and for in-place
    operations the identity of the returned tensor.
    """
    real = func(*args, **kwargs)
    inputs = [a for a in args if isinstance(a, Tensor)]
    real_inplace, ours_inplace = any(real is a for a in inputs), any(out is a for a in inputs)
    same = isinstance(real, Tensor) and _layout(real) == _layout(out) and real_inplace == ours_inplace
    if not same or (real_inplace and real is not out):
        want = (_layout(real), "in place" if real_inplace else "new") if isinstance(real, Tensor) else real
        raise Mismatch(f"shortcut for {getattr(func, '__name__', func)} gave "
                             f"{(_layout(out), 'in place' if ours_inplace else 'new')}, PyTorch gives {want}")
