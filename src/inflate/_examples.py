"""Example calls guessed from a model when none is given.

The first conv or linear layer gives the input's channel count ``C`` (a known stem that reads
the input as a whole, such as CSATv2's or a ``MixedConv2d``, gives its own: its convs read a
share of it), a timm ``pretrained_cfg`` the spatial size and another ``C`` to try, and a
diffusers config the whole call (:func:`inflate._configs.config_calls`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _rewrites as rewriting
from ._call import Call
from ._configs import config_calls
from ._errors import InflateError

__all__ = ["default_example_calls", "default_example_inputs"]


def default_example_calls(model: nn.Module) -> list[Call]:
    """Example calls to try in order: those a known config describes (a diffusers UNet),
    else one tensor of each plausible input shape (:func:`default_example_inputs`)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None)
    known = config_calls(model, first.weight.dtype) if first is not None else []
    return known or [Call((x,)) for x in default_example_inputs(model)]


def default_example_inputs(model: nn.Module) -> list[Tensor]:
    """Meta tensors of plausible input shapes, tried in order.

    ``C`` comes from the first conv or linear layer (or known stem), then from a timm
    ``pretrained_cfg``; the spatial size from that ``pretrained_cfg`` (else 224).
    """
    for first in model.modules():
        stem = rewriting.stem_channels(first)  # a known stem (CSATv2's, a MixedConv2d): its convs read less
        if stem is not None:
            first, in_channels = next(m for m in first.modules() if isinstance(m, nn.modules.conv._ConvNd)), stem
            break
        if isinstance(first, (nn.modules.conv._ConvNd, nn.Linear)):
            in_channels = first.in_features if isinstance(first, nn.Linear) else first.in_channels
            break
    else:
        raise InflateError("example_input: expected a model with a Conv or Linear layer to guess the input "
                           f"shape from, found none in {type(model).__name__}; pass example_input")
    dtype = first.weight.dtype
    if isinstance(first, nn.Linear):
        return [torch.empty(2, in_channels, device="meta", dtype=dtype)]
    cfg_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", ()))
    dims = len(first.kernel_size)
    spatial = {1: (256,), 2: cfg_size[1:] if len(cfg_size) == 3 else (224, 224), 3: (16, 112, 112)}[dims]
    counts = dict.fromkeys([in_channels] + ([cfg_size[0]] if len(cfg_size) == 3 else []))
    return [torch.empty(2, c, *spatial, device="meta", dtype=dtype) for c in counts]
