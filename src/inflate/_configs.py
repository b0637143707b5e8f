"""Config holders kept in step with the new input, and the example inputs configs describe.

timm's ``pretrained_cfg`` (``in_chans``, ``input_size``, per-input ``mean``/``std``), a
diffusers model's ``config.in_channels`` (through diffusers' own ``register_to_config``, so
``save_pretrained`` then ``from_pretrained`` rebuilds the inflated model) and a transformers
model's ``config.num_channels`` with the ``num_channels`` its embeddings check the input
against. No library is imported: the holders are recognised by what they hold.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _standardized as standardized
from ._call import Call
from ._errors import InexactError

__all__ = ["config_attrs", "config_calls", "update_configs"]


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


def _transformers_config(model: nn.Module) -> Any:
    """A transformers model's config, if it says the input's channel count (``num_channels``)."""
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("transformers.") and type(getattr(config, "num_channels", None)) is int:
        return config
    return None


def config_attrs(model: nn.Module, channels: Sequence[int],
                 weights: Mapping[int, torch.Tensor] | None = None) -> dict[int, dict[str, Any]]:
    """The plain module attributes that gate the forward on the input's channel count, with
    their values for inputs of ``channels`` channels each: ``{id(module): {name: value}}``.

    A transformers vision model's embeddings store ``num_channels`` and raise on an input
    of another count, so the inflated model runs only with them set. Every transformers
    submodule whose ``num_channels`` is the config's count gets ``sum(channels)``; the
    replay of the inflated model (:func:`inflate._verify.verify`) runs with these set, so
    an attribute that meant something else makes that replay fail and the model is refused.

    ``weights`` maps ``id(parameter or buffer)`` to its planned replacement. With it, the
    model is also rebuilt from its config with the new ``num_channels`` on the meta device
    (what ``from_pretrained`` would build), and every tensor of that rebuild must have the
    planned shape.

    Raises:
        InexactError: the new ``num_channels`` also sizes a tensor that is not widened (the
            pixel decoder of a masked-image-modeling head): ``save_pretrained`` then
            ``from_pretrained`` would not rebuild the inflated model.
    """
    config = _transformers_config(model)
    if config is None:
        return {}
    old, total = config.num_channels, sum(channels)
    if weights is not None:
        _check_rebuild(model, config, total, weights)
    return {id(m): {"num_channels": total} for m in model.modules()
            if type(m).__module__.startswith("transformers.") and type(getattr(m, "num_channels", None)) is int
            and m.num_channels == old}


def _check_rebuild(model: nn.Module, config: Any, total: int, weights: Mapping[int, torch.Tensor]) -> None:
    """Refuse an inflation that ``from_pretrained`` of the saved model would not rebuild."""
    for name, module in model.named_modules():
        if standardized.known(module) and id(module.weight) in weights:
            raise InexactError(
                f"layer '{name}' ({type(module).__name__}) would standardize each input's block of its weight on its "
                f"own, which {type(module).__name__} cannot express: {type(model).__name__}.from_pretrained of the "
                f"saved model would build a layer standardizing over all {total} channels, a different model (the "
                "widened layer itself is exact: timm models, whose layers are not rebuilt from a config, keep it)")
    new = copy.deepcopy(config)
    new.num_channels = total
    try:
        with torch.device("meta"):
            twin = type(model)(new)
    except Exception:  # noqa: BLE001 - a model its config alone cannot build: nothing to compare with
        return
    rebuilt = twin.state_dict(keep_vars=True)
    wrong = []
    for name, t in model.state_dict(keep_vars=True).items():
        expected = tuple(weights.get(id(t), t).shape)
        if name in rebuilt and tuple(rebuilt[name].shape) != expected:
            wrong.append(f"'{name}' {expected} but {tuple(rebuilt[name].shape)} from the config")
    if wrong:
        raise InexactError(f"config.num_channels={total} (was {config.num_channels}) also sizes tensors that are not "
                           f"widened, so {type(model).__name__}.from_pretrained would not rebuild the inflated model: "
                           + "; ".join(wrong[:4]))


def update_configs(model: nn.Module, channels: Sequence[int]) -> None:
    """Update every config holder of ``model`` for inputs of ``channels`` channels each."""
    update_pretrained_cfg(model, channels)
    if _diffusers_config(model) is not None:
        model.register_to_config(in_channels=sum(channels))
    config = _transformers_config(model)
    if config is not None:
        attrs = config_attrs(model, channels)
        for module in model.modules():
            for name, value in attrs.get(id(module), {}).items():
                setattr(module, name, value)
        for holder in {id(c): c for c in _configs_of(model, config.num_channels)}.values():
            holder.num_channels = sum(channels)


def _configs_of(model: nn.Module, old: int) -> list[Any]:
    """The transformers configs of ``model`` and its submodules (a sub-model's may be its own
    object) that say ``old`` channels."""
    return [c for m in model.modules() if (c := _transformers_config(m)) is not None and c.num_channels == old]


def _transformers_calls(model: nn.Module, dtype: torch.dtype) -> list[Call]:
    """A transformers vision model with ``config.image_size``: ``pixel_values`` of
    ``(1, num_channels, H, W)``, if its forward takes ``pixel_values``."""
    config = _transformers_config(model)
    size = getattr(config, "image_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        size = tuple(size)
    elif type(size) is int:
        size = (size, size)
    else:
        return []
    if "pixel_values" not in _forward_parameters(model) or not all(type(s) is int and s > 0 for s in size):
        return []
    x = torch.empty(1, config.num_channels, *size, dtype=dtype, device="meta")
    return [Call((), {"pixel_values": x}, "pixel_values")]


def config_calls(model: nn.Module, dtype: torch.dtype) -> list[Call]:
    """Example calls a known config describes (meta tensors), or none.

    A diffusers model whose forward takes ``sample``: ``sample`` of ``(1, in_channels,
    sample_size, sample_size)``, and the ``timestep`` and (with ``cross_attention_dim``)
    ``encoder_hidden_states`` of one token that a UNet's forward takes; a VAE
    (``AutoencoderKL``) gets the ``sample`` alone. A transformers vision model with
    ``config.image_size``: ``pixel_values`` of ``(1, num_channels, H, W)``.
    """
    if _transformers_config(model) is not None:
        return _transformers_calls(model, dtype)
    config = _diffusers_config(model)
    takes = _forward_parameters(model)
    if config is None or config.get("sample_size") is None or "sample" not in takes:
        return []
    size = config["sample_size"]
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    kwargs: dict[str, Any] = {"sample": torch.empty(1, config["in_channels"], *size, dtype=dtype, device="meta")}
    if "timestep" in takes:
        kwargs["timestep"] = torch.tensor([1], device="meta")
    dim = config.get("cross_attention_dim")
    if isinstance(dim, int) and "encoder_hidden_states" in takes:
        kwargs["encoder_hidden_states"] = torch.empty(1, 1, dim, dtype=dtype, device="meta")
    return [Call((), kwargs, "sample")]


def _forward_parameters(model: nn.Module) -> set[str]:
    """The parameter names of ``model.forward`` (none if its signature cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
