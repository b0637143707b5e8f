"""Preprocessing kept in step with an inflated model: per-input normalisation statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from ._configs import _per_input
from ._errors import InflateError

__all__ = ["inflate_normalization"]

T = TypeVar("T")
#: Attribute (or key) pairs that hold per-channel statistics, by the libraries that use them.
_PAIRS = (("image_mean", "image_std"),  # Hugging Face image processors
          ("mean", "std"))  # torchvision Normalize (v1 and v2), timm data configs


def _numbers(values: Any) -> list[float] | None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        return None
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return list(values)


def _plan(holder: Any, num_inputs: int, channels: Sequence[int] | None) -> list[tuple[Any, str, Any]]:
    """The new statistics of ``holder`` (attributes or dict keys): ``(holder, key, value)``."""
    get = holder.get if isinstance(holder, dict) else lambda k: getattr(holder, k, None)
    changes = []
    for mean_key, std_key in _PAIRS:
        mean, std = _numbers(get(mean_key)), _numbers(get(std_key))
        if mean is None or std is None:
            continue
        if len(mean) != len(std):
            raise InflateError(f"{type(holder).__name__}.{mean_key}/{std_key}: expected one value per channel in "
                               f"each, got {len(mean)} and {len(std)}")
        counts = tuple(channels) if channels is not None else (len(mean),) * num_inputs
        for key, values in ((mean_key, mean), (std_key, std)):
            kind = type(get(key)) if type(get(key)) in (list, tuple) else list
            changes.append((holder, key, kind(_per_input(values, counts))))
    return changes


def inflate_normalization(transform: T, num_inputs: int = 2, *, channels: Sequence[int] | None = None) -> T:
    """Repeat the per-channel ``mean``/``std`` of a preprocessing step for ``num_inputs`` inputs.

    The preprocessing people already use then keeps matching the inflated model: input
    ``i`` of a ``(B, N*C, H, W)`` stack is normalised with the original statistics. An
    input with another channel count (``channels``) gets their average, as timm's
    ``pretrained_cfg`` does after :func:`~inflate.inflate_first_conv`.

    Handles a Hugging Face image processor (``image_mean``/``image_std``), torchvision's
    ``Normalize`` (``transforms`` and ``transforms.v2``), a ``Compose`` of them (every
    step), and a dict such as timm's data config (``mean``/``std``). Changed in place.

    Args:
        transform: the processor, transform, ``Compose`` or dict.
        num_inputs: ``N``.
        channels: channel count of each input, as in :func:`~inflate.inflate_first_conv`.

    Returns:
        ``transform`` itself.

    Raises:
        InflateError: nothing holding per-channel statistics was found, or the arguments
            are invalid.

    Example:
        >>> from inflate import inflate_normalization
        >>> cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
        >>> inflate_normalization(cfg, 2)["mean"]
        (0.485, 0.456, 0.406, 0.485, 0.456, 0.406)
    """
    if not isinstance(num_inputs, int) or isinstance(num_inputs, bool) or num_inputs < 1:
        raise InflateError(f"num_inputs: expected an int >= 1, got {num_inputs!r}")
    if channels is not None and (len(channels) != num_inputs or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels)):
        raise InflateError(f"channels: expected {num_inputs} counts >= 1 (one per input), got {channels!r}")
    steps = getattr(transform, "transforms", None)
    holders = list(steps) if isinstance(steps, (list, tuple)) else [transform]
    changes = [change for holder in holders for change in _plan(holder, num_inputs, channels)]
    if not changes:
        raise InflateError(f"transform: expected an image processor, a Normalize, a Compose or a dict holding "
                           f"per-channel mean and std, got {type(transform).__name__} without them")
    for holder, key, value in changes:  # all planned first: an error above changes nothing
        if isinstance(holder, dict):
            holder[key] = value
        else:
            setattr(holder, key, value)
    return transform
