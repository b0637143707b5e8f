"""Forwards that treat each input channel in code, rewritten into an equal form that inflate can widen.

torchvision's GoogLeNet and Inception v3, built with ``transform_input=True`` (the default
with their pretrained weights), re-normalise the input one channel at a time::

    x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5   # ... x_ch1, x_ch2
    x = torch.cat((x_ch0, x_ch1, x_ch2), 1)

which reads exactly three channels whatever the input holds. The rewrite computes the same
``x * scale + shift`` from two lists of ``C`` numbers kept on the module (``input_scale``,
``input_shift``), which the tracker then widens per input like any normaliser kept as a
list (rule 6 on the concepts page). Each element goes through the same two roundings as
in the original (a multiply, then an add, in the input's dtype), so the rewritten model is
bit for bit the original.

timm's CSATv2 converts RGB to YCbCr in its DCT stem (``LearnableDct2d``): each output
channel mixes the three input channels, then each of Y, Cb and Cr goes through a DCT of
8x8 patches to its own 1x1 conv. The rewrite (``PerInputLearnableDct2d``) makes the same
computation for ``N`` inputs of 3 channels each: every input gets its own YCbCr conversion
and DCT, and each conv reads the ``N`` inputs' coefficients side by side (``N * 64``
channels, one block per input). With one input it runs exactly the original's operations on
the same tensors, so it is bit for bit the original. Such a stem reads the input as a whole
(:func:`reader`): the tracker does not follow the operations inside it, it records its convs
as the layers that read the input, one block of 64 coefficients per input of 3 channels.

timm's ``MixedConv2d`` splits its input's channels among convs of different kernel sizes
(``torch.split(x, self.splits, 1)``), which for ``N`` inputs side by side would hand each
conv a slice across inputs. Its rewrite (``PerInputMixedConv2d``) splits each input's
``C`` channels the same way and hands conv ``j`` its share of every input, side by side; a
reader as well. Every ``MixedConv2d`` is rewritten for discovery, and only those that read
the input keep the rewrite.

The rewrite swaps the module's class for a subclass defined here (``isinstance`` holds and
the ``state_dict`` is unchanged; ``torch.save`` of the whole model pickles the subclass by
name), for the duration of discovery and of the check, and for good only when the inflation
is applied.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Rewrite", "Reader", "find", "reader", "stem_channels", "rewritten", "commit"]

#: torchvision's per-channel input transform (the same numbers in GoogLeNet and Inception v3)
_SCALE = (0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5)
_SHIFT = ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5)
#: (module, class name) of the torchvision models whose ``_transform_input`` is rewritten
_KNOWN = {("torchvision.models.googlenet", "GoogLeNet"), ("torchvision.models.inception", "Inception3")}
#: (module, class name) of the stems that convert each input's colours in code, rewritten to read inputs one by one
_STEMS = {("timm.models.csatv2", "LearnableDct2d"): "csatv2", ("timm.layers.mixed_conv2d", "MixedConv2d"): "mixed"}
_CLASSES: dict[str, type] = {}


def _transform_input(self: nn.Module, x: Tensor) -> Tensor:
    """``x * scale + shift`` per channel, from the module's lists: any number of channels."""
    if self.transform_input:
        scale = torch.as_tensor(self.input_scale, dtype=x.dtype, device=x.device)
        shift = torch.as_tensor(self.input_shift, dtype=x.dtype, device=x.device)
        x = x * scale[:, None, None] + shift[:, None, None]
    return x


def _per_input(base: type, methods: dict[str, Any], what: str) -> type:
    """``PerInput<base>``, the subclass of ``base`` with ``methods``, made once (picklable by name)."""
    name = f"PerInput{base.__name__}"
    cls = _CLASSES.get(name)
    if cls is None:
        doc = f"{base.__module__.split('.')[0]}'s {base.__name__} {what} (made by :func:`inflate.inflate_first_conv`)."
        cls = _CLASSES[name] = type(name, (base,), {**methods, "__module__": __name__, "__qualname__": name,
                                                    "__doc__": doc})
    return cls


def _subclass(base: type) -> type:
    return _per_input(base, {"_transform_input": _transform_input}, "with its input transform read from "
                      "``input_scale`` and ``input_shift``, one value per input channel")


def _dct_coefficients(self: nn.Module, x: Tensor) -> Tensor:
    """``(B, 3, H, W)`` -> ``(B, 3, k*k, H/k, W/k)``: YCbCr, then the normalized DCT of each k x k patch,
    the operations of timm's ``LearnableDct2d.forward`` up to its convs."""
    b, c, h, w = x.shape
    k = self.k
    x = self._rgb_to_ycbcr(self._denormalize(x))
    x = x.reshape(b, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5)  # (B, H/k, W/k, C, k, k)
    x = self.transform(x).reshape(-1, c, k * k)[:, :, self.permutation]
    x = self._frequency_normalize(x).reshape(b, h // k, w // k, c, -1)
    return x.permute(0, 3, 4, 1, 2).contiguous()


def _dct_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Inputs of 3 channels side by side, ``(B, N*3, H, W)``: each converted and transformed on
    its own; conv ``j`` (Y, Cb, Cr) reads component ``j`` of every input, ``N * k*k`` channels."""
    b, c, h, w = x.shape
    torch._assert(c % 3 == 0, "expected inputs of 3 channels (RGB) side by side")  # torch.fx traces it
    n, k = c // 3, self.k
    coefficients = _dct_coefficients(self, x.reshape(b * n, 3, h, w))
    coefficients = coefficients.reshape(b, n, 3, k * k, h // k, w // k)
    convs = (self.conv_y, self.conv_cb, self.conv_cr)
    return torch.cat([conv(coefficients[:, :, j].flatten(1, 2)) for j, conv in enumerate(convs)], dim=1)


def _mixed_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Inputs of ``sum(splits)`` channels side by side: each split alike, conv ``j`` reads split ``j``
    of every input."""
    b, c, h, w = x.shape
    per_input = sum(self.splits)
    torch._assert(c % per_input == 0, "expected inputs of sum(splits) channels side by side")  # torch.fx traces it
    pieces = torch.split(x.reshape(b, c // per_input, per_input, h, w), self.splits, 2)
    return torch.cat([conv(pieces[j].flatten(1, 2)) for j, conv in enumerate(self.values())], 1)


_FORWARDS = {
    "csatv2": (_dct_forward, "for inputs of 3 channels side by side, each converted to YCbCr and transformed alone"),
    "mixed": (_mixed_forward, "for inputs side by side, each split among the convs on its own"),
}


def _stem_subclass(base: type) -> type:
    forward, what = _FORWARDS[_STEMS[(base.__module__, base.__name__)]]
    return _per_input(base, {"forward": forward}, what)


@dataclass(frozen=True)
class Reader:
    """A rewritten stem that reads the input as a whole, each input on its own.

    Attributes:
        channels: the channels of one input it reads as one (3: an RGB image).
        layers: ``(child, inner, per_unit)`` of each conv that reads the inputs: its kernel
            holds ``per_unit`` channels of ``inner`` features each per input.
    """

    channels: int
    layers: tuple[tuple[str, int, int], ...]


def _reads(module: nn.Module) -> Reader | None:
    """What a known stem reads (rewritten or not)."""
    kind = type(module)
    stem = _STEMS.get((kind.__module__, kind.__name__))
    if stem is None and _CLASSES.get(kind.__name__) is kind:
        stem = _STEMS.get((kind.__mro__[1].__module__, kind.__mro__[1].__name__))
    if stem == "csatv2":
        inner = module.k * module.k
        return Reader(3, (("conv_y", inner, 1), ("conv_cb", inner, 1), ("conv_cr", inner, 1)))
    if stem == "mixed":
        return Reader(sum(module.splits), tuple((name, 1, s) for name, s in zip(module.keys(), module.splits)))
    return None


def reader(module: nn.Module) -> Reader | None:
    """What a rewritten stem reads, if ``module`` is one (see the module docstring)."""
    kind = type(module)
    return _reads(module) if _CLASSES.get(kind.__name__) is kind else None


def stem_channels(module: nn.Module) -> int | None:
    """The channel count of the input a known stem (rewritten or not) takes as it is, if ``module`` is one."""
    reads = _reads(module)
    if reads is None:
        return None
    child, inner, per_unit = reads.layers[0]
    return module.get_submodule(child).in_channels // (inner * per_unit) * reads.channels


def __getattr__(name: str) -> type:
    """The subclasses by name, made on first use: what unpickling a saved model asks for."""
    if name in ("PerInputGoogLeNet", "PerInputInception3"):
        import torchvision.models as models  # noqa: PLC0415 - only models that were rewritten need it

        return _subclass(getattr(models, name[len("PerInput"):]))
    paths = {f"PerInput{cls}": path for path, cls in _STEMS}
    if name in paths:
        import importlib  # noqa: PLC0415 - only models that were rewritten need timm

        # by path: ``timm.models.csatv2`` as an attribute is the model function of that name
        return _stem_subclass(getattr(importlib.import_module(paths[name]), name[len("PerInput"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Rewrite:
    """One module to rewrite: its new class and the attributes that class reads."""

    module: nn.Module
    cls: type
    attrs: dict[str, Any]
    reads: bool = False  # a stem that reads each input on its own: kept only where it reads the input


def find(model: nn.Module) -> list[Rewrite]:
    """The modules of ``model`` whose forward needs a rewrite before inflation."""
    found = []
    for module in model.modules():
        kind = type(module)
        if {"forward", "_transform_input"} & set(vars(module)):
            continue  # a forward set on the instance is not the one rewritten: followed as it is
        if (kind.__module__, kind.__name__) in _KNOWN and getattr(module, "transform_input", False) is True:
            found.append(Rewrite(module, _subclass(kind), {"input_scale": list(_SCALE), "input_shift": list(_SHIFT)}))
        elif (kind.__module__, kind.__name__) in _STEMS:
            found.append(Rewrite(module, _stem_subclass(kind), {}, reads=True))
    return found


@contextmanager
def rewritten(rewrites: Sequence[Rewrite]) -> Iterator[None]:
    """The rewrites in place for the duration; afterwards each module is what it was."""
    saved = [(r.module, r.module.__class__, {k: r.module.__dict__[k] for k in r.attrs if k in r.module.__dict__})
             for r in rewrites]
    try:
        commit(rewrites)
        yield
    finally:
        for (module, cls, before), r in zip(saved, rewrites):
            module.__class__ = cls
            for key in r.attrs:
                module.__dict__.pop(key, None)
            module.__dict__.update(before)


def commit(rewrites: Sequence[Rewrite]) -> None:
    """Make the rewrites for good (attribute assignments only, which do not fail)."""
    for r in rewrites:
        r.module.__class__ = r.cls
        r.module.__dict__.update({k: list(v) for k, v in r.attrs.items()})
