"""Weight-standardized convolutions, widened exactly: one standardization per input.

timm's ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``, ``ScaledStdConv2dSame`` and
transformers' BiT ``WeightStandardizedConv2d`` convolve with their weight standardized over
each output channel's fan-in, ``g * (W - mean) / sqrt(var + eps)`` (``g``: 1, or
``gain * gamma / sqrt(fan_in)``). Widened zeros or copies would change that mean and
variance, so the widened layer standardizes **each input's block of the kernel on its own**
and multiplies block ``i`` of output channel ``o`` by a *share* of the gain,
``shares[i, o]``. Block ``i`` is then exactly a standardized conv on input ``i``:

* ``"zero"``: blocks ``[W, 0, ...]``, shares 1. Block 0 is standardized as before (the same
  fan-in, the same eps); a zero block stays exactly zero (``0 / sqrt(0 + eps)``).
* ``"repeat"``: blocks ``[W, W, ...]`` stored unscaled, shares ``1/N`` (with ``scale``).
  Scaling the stored blocks instead would be wrong: standardization with ``eps`` is not
  scale invariant (``var / N**2 + eps != (var + eps) / N**2``).
* anything else (``"average"``, inputs of another channel count, a callable, a layer
  inflated before): the rule is applied to the standardized kernel ``K`` (what the layer
  convolves with, before its gain), each block ``T`` is stored as it is and gets the share
  ``sqrt(var(T) + eps)``, so that ``standardize(T) * share = T - mean(T) = T``: exact when
  every output channel of ``T`` has zero mean, which a standardized kernel has and which
  ``"average"`` keeps; a callable's block without it is refused.

Scaling the stored weight still leaves the output unchanged (up to ``eps``): the layer keeps
standardizing while it trains. The widened module is an instance of a subclass of its own
class defined here (``InflatedStdConv2d`` ...; picklable: rebuilt by name on load), with
the channel count of each input in ``block_channels`` and the shares in a non-persistent
buffer ``block_shares``, so its ``state_dict`` keys are the original ones.

The classes are recognised by module and name, so neither timm nor transformers is imported
here. Their weight computation is opaque to the tracers (:func:`weight_tensors`): neither
recorded by discovery nor compared by the replay, which check the convolution itself.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import InflateError
from .rules import Init, KernelLayout, from_canonical, inflate_kernel, to_canonical

__all__ = ["convert", "known", "stand_in", "weight_tensors", "widen", "widened_class"]

#: (module, class name) -> whether the class scales its standardized weight by ``gain * scale``
_KNOWN: dict[tuple[str, str], bool] = {
    ("timm.layers.std_conv", "StdConv2d"): False,
    ("timm.layers.std_conv", "StdConv2dSame"): False,
    ("timm.layers.std_conv", "ScaledStdConv2d"): True,
    ("timm.layers.std_conv", "ScaledStdConv2dSame"): True,
    ("transformers.models.bit.modeling_bit", "WeightStandardizedConv2d"): False,
}
_PREFIX = "Inflated"


def _base(cls: type) -> type | None:
    """The known class ``cls`` is, or widens; None if neither."""
    cls = getattr(cls, "_inflate_base", cls)
    return cls if (cls.__module__, cls.__qualname__) in _KNOWN else None


def known(module: nn.Module) -> bool:
    """Whether ``module`` is a weight-standardized conv whose forward inflate knows (exactly
    that class: a subclass may compute otherwise), or one that inflate widened."""
    forward = vars(module).get("forward")  # an instance's own forward: only the replay's stand-in
    return _base(type(module)) is not None and (forward is None or getattr(forward, "func", None) is _forward)


def weight_tensors(module: nn.Module) -> dict[int, Tensor] | None:
    """For a known module being called: the tensors its weight is computed from (its
    parameters, buffers and tensor attributes, by id), else None."""
    if not known(module):
        return None
    found = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
    return {id(t): t for t in found if isinstance(t, Tensor)}


def _standardize(weight: Tensor, counts: Sequence[int], shares: Tensor | None, gain: Tensor | None,
                 eps: float) -> Tensor:
    """Each block of ``counts`` input channels of ``weight`` standardized over its own fan-in,
    times ``gain * shares[i]`` (each None: 1), as the layers' own ``F.batch_norm`` does it.

    Example:
        >>> w = torch.tensor([[[[1.0]], [[3.0]], [[0.0]], [[0.0]]]])  # (out=1, 4, 1, 1): [W, 0]
        >>> [round(v, 6) for v in _standardize(w, [2, 2], None, None, eps=1e-12).flatten().tolist()]
        [-1.0, 1.0, 0.0, 0.0]
    """
    out = weight.shape[0]
    blocks = weight.split(list(counts), dim=1) if len(counts) > 1 else (weight,)
    rows = shares.unbind(0) if shares is not None else (None,) * len(blocks)
    parts = []
    for block, share in zip(blocks, rows):
        scale = gain if share is None else share if gain is None else gain * share
        parts.append(F.batch_norm(block.reshape(1, out, -1), None, None, weight=scale, training=True, momentum=0.0,
                                  eps=eps).reshape_as(block))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _weight(module: nn.Module) -> Tensor:
    """What ``module`` convolves with."""
    base = _base(type(module))
    scaled = base is not None and _KNOWN[base.__module__, base.__qualname__]
    gain = (module.gain * module.scale).view(-1) if scaled else None
    counts = getattr(module, "block_channels", (module.weight.shape[1],))
    return _standardize(module.weight, counts, getattr(module, "block_shares", None), gain, module.eps)


def _forward(module: nn.Module, x: Tensor) -> Tensor:
    """The known forwards, with the weight standardized per input: the same operations on ``x``."""
    if getattr(module, "same_pad", False):  # timm's *Same: TF "SAME" padding, from the input's size
        base = _base(type(module))
        assert base is not None
        x = vars(sys.modules[base.__module__])["pad_same"](x, module.kernel_size, module.stride, module.dilation)
    pad = getattr(module, "pad", None)
    if pad is not None:  # transformers' DynamicPad2d
        x = pad(x)
    return F.conv2d(x, _weight(module), module.bias, module.stride, module.padding, module.dilation, module.groups)


class _PerInput:
    """Mixin of the widened classes: the kernel standardized per input (see the module docs)."""

    _inflate_base: type
    block_channels: tuple[int, ...]

    def forward(self, x: Tensor) -> Tensor:
        return _forward(self, x)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_channels={self.block_channels}"  # type: ignore[misc]


def widened_class(base: type) -> type:
    """The subclass of known class ``base`` that standardizes per input (``base`` itself if it is one)."""
    if _PerInput in base.__mro__:
        return base
    name = _PREFIX + base.__qualname__
    cls = globals().get(name)
    if cls is None:
        cls = type(name, (_PerInput, base), {"__module__": __name__, "__qualname__": name, "_inflate_base": base})
        globals()[name] = cls
    return cls


def __getattr__(name: str) -> Any:
    """Rebuild a widened class by name (what unpickling a widened module asks for)."""
    for (module, qualname) in _KNOWN:
        if name == _PREFIX + qualname:
            return widened_class(getattr(importlib.import_module(module), qualname))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _zero_mean(block: Tensor, kernel: Tensor, label: str, index: int) -> None:
    """Refuse a callable's block that a standardization cannot give: one whose output channels
    do not have zero mean, to rounding. ``K``'s own mean is rounding noise of up to about
    ``eps * |mean(W)| / std(W)``, and an average of ``K`` is nothing but noise where ``K``'s
    channels cancel, so the bound is ``sqrt(eps)`` of the block's or ``K``'s entries,
    whichever are larger: far below any block drawn at random."""
    if block.is_meta:
        return
    flat = block.reshape(block.shape[0], -1)
    size = torch.maximum(flat.abs().amax(1), kernel.reshape(kernel.shape[0], -1).abs().amax(1))
    tol = torch.finfo(block.dtype).eps ** 0.5 * size
    mean = flat.mean(1)
    if bool((mean.abs() > tol).any()):
        worst = int((mean.abs() - tol).argmax())
        raise InflateError(f"{label}: a weight-standardized layer convolves with a kernel of zero mean per output "
                           f"channel, expected such a block for input {index}, got mean {float(mean[worst]):.3g} "
                           f"for output channel {worst}; subtract block.mean((1, ...), keepdim=True) in the init "
                           "callable")


def widen(module: nn.Module, label: str, layout: KernelLayout, channels: Sequence[int], init: Init,
          scale: bool) -> tuple[Tensor, Tensor]:
    """The stored weight ``(out, sum(channels), *k)`` and the shares ``(N, out)`` of ``module``
    widened for inputs of ``channels`` channels (see the module docs).

    Raises:
        InflateError: a grouped or reordered layer, or a callable's block that no
            standardization gives.
    """
    if layout != KernelLayout("conv"):
        raise InflateError(f"{label}: expected a weight-standardized conv that reads the input as it is (groups=1), "
                           f"got {layout}")
    plain = not hasattr(module, "block_channels")  # not widened before: its stored weight is one block
    if plain and hasattr(module, "block_shares"):
        raise InflateError(f"{label}: expected no attribute 'block_shares', found one")
    weight = module.weight.detach()
    out, c = weight.shape[:2]
    n = len(channels)
    work = torch.promote_types(weight.dtype, torch.float32)
    counts = getattr(module, "block_channels", (c,))
    shares = getattr(module, "block_shares", None)
    kernel = _standardize(weight.to(work), counts, None if shares is None else shares.to(work), None, module.eps)
    if callable(init):  # a callable is promised the canonical form, and the standardized kernel
        target = from_canonical(inflate_kernel(to_canonical(kernel, layout), channels, init, scale), layout)
    else:
        target = inflate_kernel(kernel, channels, init, scale)
    stored, gains = [], []
    for i, (ci, block) in enumerate(zip(channels, target.split(list(channels), dim=1))):
        if plain and ci == c and (init == "repeat" or init == "zero" and i == 0):  # a multiple of the kernel
            stored.append(weight)
            gains.append(torch.full((out,), 1.0 / n if init == "repeat" and scale else 1.0, dtype=torch.float64,
                                    device=weight.device))
            continue
        if callable(init):  # the named rules give blocks of zero mean: "average" sums K over channels
            _zero_mean(block, kernel, label, i)
        block = block.to(weight.dtype)
        var = block.double().reshape(out, -1).var(1, unbiased=False)
        empty = block.reshape(out, -1).eq(0).all(1)  # standardizes to exactly 0 whatever its share: 1
        gains.append(torch.where(empty, torch.ones_like(var), (var + module.eps).sqrt()))
        stored.append(block)
    return torch.cat(stored, dim=1), torch.stack(gains).to(dtype=weight.dtype, device=weight.device)


def stand_in(module: nn.Module, channels: Sequence[int], shares: Tensor) -> dict[str, Any]:
    """Attributes that make ``module`` compute as its widened self during the replay."""
    forward: Callable[[Tensor], Tensor] = functools.partial(_forward, module)
    return {"forward": forward, "block_channels": tuple(channels), "block_shares": shares}


def convert(module: nn.Module, channels: Sequence[int], shares: Tensor) -> None:
    """Make ``module`` its widened self (after its weight was swapped); does not fail."""
    module.__class__ = widened_class(type(module))
    module.block_channels = tuple(channels)
    module.register_buffer("block_shares", shares, persistent=False)
