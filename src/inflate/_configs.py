"""Config holders kept in step with the new input, and the example inputs configs describe.

timm's ``pretrained_cfg`` (``in_chans``, ``input_size``, per-input ``mean``/``std``) and a
diffusers model's ``config.in_channels`` (through diffusers' own ``register_to_config``, so
``save_pretrained`` then ``from_pretrained`` rebuilds the inflated model). Neither library is
imported: the holders are recognised by what they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._call import Call

__all__ = ["update_configs", "config_calls"]


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


def _diffusers_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("diffusers.") and hasattr(model, "register_to_config") \
            and isinstance(getattr(config, "get", None) and config.get("in_channels"), int):
        return config
    return None


def update_configs(model: nn.Module, channels: Sequence[int]) -> None:
    """Update every config holder of ``model`` for inputs of ``channels`` channels each."""
    update_pretrained_cfg(model, channels)
    if _diffusers_config(model) is not None:
        model.register_to_config(in_channels=sum(channels))


def config_calls(model: nn.Module, dtype: torch.dtype) -> list[Call]:
    """Example calls a known config describes (meta tensors), or none.

    A diffusers UNet: ``sample`` of ``(1, in_channels, sample_size, sample_size)``, a
    ``timestep`` and, for a conditional one, ``encoder_hidden_states`` of one token.
    """
    config = _diffusers_config(model)
    if config is None or config.get("sample_size") is None:
        return []
    size = config["sample_size"]
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    kwargs: dict[str, Any] = {"sample": torch.empty(1, config["in_channels"], *size, dtype=dtype, device="meta"),
                              "timestep": torch.tensor([1], device="meta")}
    dim = config.get("cross_attention_dim")
    if isinstance(dim, int):
        kwargs["encoder_hidden_states"] = torch.empty(1, 1, dim, dtype=dtype, device="meta")
    return [Call((), kwargs, "sample")]
