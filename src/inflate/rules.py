"""Pure tensor math of the inflation rules; no ``nn.Module`` in sight.

Every rule works on a *canonical kernel* of shape ``(out, C, *rest)``: the
output axis first, the input-channel axis second. :func:`to_canonical` and
:func:`from_canonical` convert the stored weights of convolutions, transposed
convolutions and linear patch embeddings to and from that form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from einops import rearrange
from torch import Tensor

from ._errors import InflateError

__all__ = ["Init", "KernelLayout", "inflate_kernel", "to_canonical", "from_canonical"]

#: An inflation rule, either a name or ``fn(kernel, index, channels) -> Tensor`` returning
#: the block for input ``index`` (0-based) of shape ``(out, channels, *rest)``.
Init = Union[str, Callable[[Tensor, int, int], Tensor]]

RULES = ("repeat", "zero", "average")


@dataclass(frozen=True)
class KernelLayout:
    """How the input channels sit in a stored weight.

    Attributes:
        kind: ``"conv"`` (weight ``(out, C/groups, *k)``), ``"transposed"``
            (weight ``(C, out/groups, *k)``) or ``"linear"`` (weight ``(out, C)``).
        groups: convolution groups (1 for linear layers).
        outer: the input-channel index of the weight is ``o*C*inner + c*inner + i``
            with ``o < outer``, ``c < C`` and ``i < inner`` (flattened patches of a
            linear patch embedding, a space-to-depth stem); 1 for a plain layer.
        inner: see ``outer``.
    """

    kind: str
    groups: int = 1
    outer: int = 1
    inner: int = 1


def _densify(weight: Tensor, groups: int, transposed: bool) -> Tensor:
    """Expand a grouped weight to the equivalent dense ``(out, C, *k)`` kernel."""
    if transposed:  # (C, out/g, *k) -> (out, C, *k)
        cin, outg = weight.shape[:2]
        out, cg = outg * groups, cin // groups
        dense = weight.new_zeros((out, cin, *weight.shape[2:]))
        for g in range(groups):
            block = weight[g * cg : (g + 1) * cg].transpose(0, 1)
            dense[g * outg : (g + 1) * outg, g * cg : (g + 1) * cg] = block
        return dense
    out, cg = weight.shape[:2]
    if groups == 1:
        return weight
    outg = out // groups
    dense = weight.new_zeros((out, cg * groups, *weight.shape[2:]))
    for g in range(groups):
        dense[g * outg : (g + 1) * outg, g * cg : (g + 1) * cg] = weight[g * outg : (g + 1) * outg]
    return dense


def to_canonical(weight: Tensor, layout: KernelLayout) -> Tensor:
    """Return the stored ``weight`` as a dense canonical kernel ``(out, C, outer, inner, *k)``.

    Grouped convolutions become the equivalent dense kernel (zeros between groups);
    ``outer`` and ``inner`` are the axes that share the input-channel axis with the
    channels (flattened patches, space-to-depth), 1 for a plain layer.

    Example:
        >>> w = torch.arange(8.0).reshape(2, 4)          # Linear(4, 2), features (o, c)
        >>> to_canonical(w, KernelLayout("linear", outer=2)).shape
        torch.Size([2, 2, 2, 1])
    """
    if layout.kind not in ("conv", "transposed", "linear"):
        raise InflateError(f"kernel layout: expected one of conv, transposed, linear, got {layout.kind!r}")
    dense = _densify(weight, layout.groups, transposed=layout.kind == "transposed")
    return rearrange(dense, "out (outer c inner) ... -> out c outer inner ...", outer=layout.outer, inner=layout.inner)


def from_canonical(kernel: Tensor, layout: KernelLayout) -> Tensor:
    """Inverse of :func:`to_canonical` for a dense result (groups become 1).

    Example:
        >>> k = torch.zeros(5, 6, 1, 1, 3, 3)            # (out, C, outer, inner, kh, kw)
        >>> from_canonical(k, KernelLayout("transposed")).shape
        torch.Size([6, 5, 3, 3])
    """
    stored = rearrange(kernel, "out c outer inner ... -> out (outer c inner) ...")
    return rearrange(stored, "out cin ... -> cin out ...") if layout.kind == "transposed" else stored


def _check_block(block: object, expected: tuple[int, ...], kernel: Tensor, index: int) -> Tensor:
    if not isinstance(block, Tensor):
        raise InflateError(f"init callable for input {index}: expected a Tensor, got {type(block).__name__}")
    if tuple(block.shape) != expected:
        raise InflateError(
            f"init callable for input {index}: expected a block of shape {expected}, got {tuple(block.shape)}"
        )
    return block.to(dtype=kernel.dtype, device=kernel.device)


def inflate_kernel(kernel: Tensor, channels: Sequence[int], init: Init = "repeat", scale: bool = True) -> Tensor:
    """Build the kernel for inputs concatenated along the channel axis.

    Input ``i`` has ``channels[i]`` channels and occupies the channel block that
    follows the blocks of inputs ``0..i-1``. ``C`` is the kernel's own channel count.

    * ``"repeat"``: an input with ``C`` channels gets the kernel itself; with
      ``scale`` every block is divided by ``N = len(channels)``, so ``N`` identical
      inputs give the original response.
    * ``"zero"``: the first input keeps the kernel, all others get zeros, so the
      response is the original one on the first input whatever the others hold.
    * ``"average"``: every channel gets ``kernel.sum(1) / channels[i]`` (the channel
      mean, rescaled), so a constant input gives the original response to that
      constant (divided by ``N`` with ``scale``).
    * a callable ``fn(kernel, i, channels[i])`` returns block ``i`` itself; ``scale``
      is not applied to it. Each call gets its own copy of ``kernel``, so a callable
      that edits its argument in place changes neither ``kernel`` nor the other blocks.

    With ``"repeat"`` or ``"zero"``, an input whose channel count differs from ``C``
    gets the ``"average"`` block.

    Args:
        kernel: canonical kernel of shape ``(out, C, *rest)``.
        channels: channel count of each input.
        init: the rule, see above.
        scale: divide the blocks by ``N`` (``"repeat"`` and ``"average"`` only).

    Returns:
        A kernel of shape ``(out, sum(channels), *rest)``, same dtype and device.

    Raises:
        InflateError: an unknown rule, or a callable returning the wrong shape.

    Example:
        >>> k = torch.ones(1, 2)
        >>> inflate_kernel(k, [2, 2], "repeat")
        tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
        >>> inflate_kernel(k, [2, 2], "zero")
        tensor([[1., 1., 0., 0.]])
        >>> inflate_kernel(k, [2, 1], "average", scale=False)
        tensor([[1., 1., 2.]])
    """
    if not callable(init) and init not in RULES:
        raise InflateError(f"init: expected one of {RULES} or a callable, got {init!r}")
    out, c, *rest = kernel.shape
    n = len(channels)
    divisor = n if scale and init in ("repeat", "average") else 1
    blocks = []
    same = None  # the block of every input with C channels under "repeat", made once
    for i, ci in enumerate(channels):
        if callable(init):
            # a copy per call: an in-place edit by user code (even one that then raises) must not
            # reach the caller's kernel, which may be a view of a model's weight
            blocks.append(_check_block(init(kernel.clone(), i, ci), (out, ci, *rest), kernel, i))
            continue
        if init == "zero" and i > 0:
            blocks.append(kernel.new_zeros((out, ci, *rest)))
        elif init == "average" or ci != c:
            mean = kernel.sum(1, keepdim=True) / ci
            blocks.append((mean / divisor).expand(out, ci, *rest))
        else:
            if same is None:
                same = kernel / divisor if divisor != 1 else kernel
            blocks.append(same)
    if len(set(channels)) == 1:  # N inputs of the same width: the N blocks side by side on the channel axis
        return rearrange(torch.stack(blocks, dim=1), "out n c ... -> out (n c) ...")
    return torch.cat(blocks, dim=1)
