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

__all__ = ["Rewrite", "find", "rewritten", "commit"]

#: torchvision's per-channel input transform (the same numbers in GoogLeNet and Inception v3)
_SCALE = (0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5)
_SHIFT = ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5)
#: (module, class name) of the torchvision models whose ``_transform_input`` is rewritten
_KNOWN = {("torchvision.models.googlenet", "GoogLeNet"), ("torchvision.models.inception", "Inception3")}
_CLASSES: dict[str, type] = {}


def _transform_input(self: nn.Module, x: Tensor) -> Tensor:
    """``x * scale + shift`` per channel, from the module's lists: any number of channels."""
    if self.transform_input:
        scale = torch.as_tensor(self.input_scale, dtype=x.dtype, device=x.device)
        shift = torch.as_tensor(self.input_shift, dtype=x.dtype, device=x.device)
        x = x * scale[:, None, None] + shift[:, None, None]
    return x


def _subclass(base: type) -> type:
    name = f"PerInput{base.__name__}"
    cls = _CLASSES.get(name)
    if cls is None:
        doc = (f"torchvision's {base.__name__} with its input transform read from ``input_scale`` and "
               "``input_shift``, one value per input channel (made by :func:`inflate.inflate_first_conv`).")
        cls = _CLASSES[name] = type(name, (base,), {"_transform_input": _transform_input, "__module__": __name__,
                                                    "__qualname__": name, "__doc__": doc})
    return cls


def __getattr__(name: str) -> type:
    """The subclasses by name, made on first use: what unpickling a saved model asks for."""
    if name in ("PerInputGoogLeNet", "PerInputInception3"):
        import torchvision.models as models  # noqa: PLC0415 - only models that were rewritten need it

        return _subclass(getattr(models, name[len("PerInput"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Rewrite:
    """One module to rewrite: its new class and the attributes that class reads."""

    module: nn.Module
    cls: type
    attrs: dict[str, Any]


def find(model: nn.Module) -> list[Rewrite]:
    """The modules of ``model`` whose forward needs a rewrite before inflation."""
    found = []
    for module in model.modules():
        kind = type(module)
        if (kind.__module__, kind.__name__) in _KNOWN and getattr(module, "transform_input", False) is True:
            found.append(Rewrite(module, _subclass(kind), {"input_scale": list(_SCALE), "input_shift": list(_SHIFT)}))
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
