"""Keep a timm model's ``pretrained_cfg`` in step with its new input (no timm import needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["update_pretrained_cfg"]


def _per_input(values: Sequence[float], channels: Sequence[int]) -> tuple[float, ...]:
    c = len(values)
    mean = sum(values) / c
    out: list[float] = []
    for ci in channels:
        out.extend(values if ci == c else [mean] * ci)
    return tuple(out)


def update_pretrained_cfg(model: nn.Module, channels: Sequence[int]) -> None:
    """Set ``in_chans``/``input_size`` and repeat ``mean``/``std`` per input.

    Inputs with the original channel count get the original statistics; others get
    their average. ``pretrained_cfg`` is replaced by a new dict, never mutated in place.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return
    new: dict[str, Any] = dict(cfg)
    total = sum(channels)
    for key in ("input_size", "test_input_size", "min_input_size"):
        if isinstance(cfg.get(key), (tuple, list)) and len(cfg[key]) >= 2:
            new[key] = (total, *cfg[key][1:])
    for key in ("mean", "std"):
        if isinstance(cfg.get(key), (tuple, list)):
            new[key] = _per_input(cfg[key], channels)
    new["in_chans"] = total
    model.pretrained_cfg = new
    if isinstance(getattr(model, "default_cfg", None), dict):
        model.default_cfg = new
