"""Batch-norm mode pinning, and a guard against batches too small for batch statistics."""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor, nn

from ._errors import InflateError
from ._tracer import unwrap

__all__ = ["BatchNormPin", "batch_norms", "pin_batchnorm"]

_MODES = ("train", "eval")
_ACTIONS = ("raise", "warn", "ignore")
_ATTR = "_inflate_pins"  # the one attribute a pinned batch norm carries: its _PinStack
_FINETUNE = "finetune"  # the owner of the pins that finetune() makes on frozen batch norms


@dataclass(eq=False)  # pins are told apart by identity: two pins with the same settings are two pins
class _Pin:
    """One pin on one batch norm: the mode it fixes and how its small-batch guard acts."""

    training: bool
    small_batch: str
    min_batch: int
    name: str
    owner: str = "pin_batchnorm"  # who made it: finetune() replaces only its own pins


class _PinStack:
    """The pins of one batch norm, newest last; the newest one applies.

    It also holds the mode the module would have without pins (``requested``, the result
    of the last ``train()``/``eval()`` that reached it) and the handle of the single
    forward pre-hook that every pin of the module shares.
    """

    def __init__(self, module: nn.Module) -> None:
        self.pins: list[_Pin] = []
        self.requested = module.training
        self.hook = module.register_forward_pre_hook(_enforce, prepend=True)


def _enforce(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: restore the newest pin's mode, then check the batch if it uses batch statistics."""
    stack = module.__dict__.get(_ATTR)
    if stack is None or not stack.pins:
        return
    pin = stack.pins[-1]
    module.training = pin.training
    if not pin.training or pin.small_batch == "ignore" or not args or not isinstance(args[0], Tensor):
        return
    x = args[0]
    if x.is_meta:  # a trace on the meta device (layers(), finetune()): no statistics are computed
        return
    message = _too_small(pin, module, x)
    if message is None:
        return
    if pin.small_batch == "raise":
        raise InflateError(message)
    warnings.warn(message, UserWarning, stacklevel=2)


def _too_small(pin: _Pin, module: nn.Module, x: Tensor) -> str | None:
    """What is wrong with ``x`` as a batch for batch statistics, or None.

    Two cases: a single value per channel (PyTorch itself raises on it), and fewer than
    ``min_batch`` samples, which PyTorch accepts: a batch of one sample of shape
    ``(1, C, H, W)`` is normalized over its own ``H*W`` positions only, as instance norm would.
    """
    values = x.numel() // max(x.shape[1], 1) if x.ndim >= 2 else x.numel()
    batch = x.shape[0] if x.ndim >= 2 else 1
    where = f"batch norm '{pin.name}' ({type(module).__name__}) pinned to train mode"
    if values <= 1:
        return (f"{where}: expected more than 1 value per channel, got shape {tuple(x.shape)} ({values} value(s) "
                "per channel); batch statistics cannot be computed from it (PyTorch raises a ValueError)")
    if batch >= pin.min_batch:
        return None
    positions = values // batch
    if batch == 1:
        source = f"the {positions} spatial position(s) of that one sample only, as instance norm would"
    else:
        source = f"{values} values from {batch} samples only"
    return (f"{where}: expected a batch of at least {pin.min_batch} samples, got {batch} (shape {tuple(x.shape)}); "
            f"each channel would be normalized over {source}, and the running statistics updated from it "
            "(min_batch=1 accepts single samples)")


def _pinned_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """Stands in for ``module.train``: run the class's own ``train`` (children follow ``mode``), note the
    mode asked for, and keep the newest pin's mode."""
    type(module).train(module, mode)
    stack = module.__dict__.get(_ATTR)
    if stack is not None and stack.pins:
        stack.requested = module.training
        module.training = stack.pins[-1].training
    return module


def _push(module: nn.Module, pin: _Pin) -> None:
    stack = module.__dict__.get(_ATTR)
    if stack is None:
        stack = _PinStack(module)
        setattr(module, _ATTR, stack)
        # nn.Module.train() sets ``training`` on each child and offers no hook for it, so an instance
        # attribute ``train`` is the one place where a batch norm can keep its mode through
        # model.train()/eval() and still read it truthfully. It is installed once per module, whatever
        # the number of pins, and reads the stack.
        module.train = partial(_pinned_train, module)  # type: ignore[method-assign]
    stack.pins.append(pin)
    module.training = pin.training


def _pop(module: nn.Module, pin: _Pin) -> None:
    stack = module.__dict__.get(_ATTR)
    if stack is None or not any(p is pin for p in stack.pins):
        return  # removed already, or this is a copy of the pinned module
    stack.pins = [p for p in stack.pins if p is not pin]
    if stack.pins:
        module.training = stack.pins[-1].training
        return
    stack.hook.remove()
    train = module.__dict__.get("train")
    if isinstance(train, partial) and train.func is _pinned_train:
        del module.__dict__["train"]
    del module.__dict__[_ATTR]
    module.training = stack.requested


class BatchNormPin:
    """Handle of :func:`pin_batchnorm`: ``remove()`` it, or use it as a context manager.

    Attributes:
        model: the pinned network (wrappers looked through).
        mode: ``"train"`` or ``"eval"``.
        modules: the pinned batch norms by name.
    """

    def __init__(self, model: nn.Module, mode: str, modules: dict[str, nn.modules.batchnorm._BatchNorm],
                 pins: dict[str, _Pin]) -> None:
        self.model = model
        self.mode = mode
        self.modules = modules
        self._pins = pins  # placed on the modules already, by pin_batchnorm or _pin_frozen

    def remove(self) -> None:
        """Unpin: each batch norm returns to the state before this pin.

        That is the newest pin still in place, or, with none left, following
        ``model.train()``/``model.eval()`` again, in the mode the last such call asked for.
        Pins may be removed in any order; removing one twice does nothing.
        """
        for name, module in self.modules.items():
            _pop(module, self._pins[name])

    def __enter__(self) -> BatchNormPin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"BatchNormPin(mode={self.mode!r}, modules={list(self.modules)})"


def pin_batchnorm(model: nn.Module, mode: str, *, small_batch: str = "warn", min_batch: int = 2) -> BatchNormPin:
    """Pin every batch norm to always-``train`` or always-``eval`` behaviour.

    ``model.train()`` and ``model.eval()`` flip batch norms between batch and running
    statistics (PyTorch issue #66073). When a network is overfitted on single batches,
    that flip makes validation see different numbers than training did. A pinned batch
    norm keeps its mode through any ``train()``/``eval()`` call until the pin is removed.
    Covers ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and subclasses such as timm's
    ``BatchNormAct2d``; a model without batch norm gets a pin that does nothing.

    Pins stack: pinning a batch norm that is pinned already puts the new pin on top, and
    the newest pin applies; removing a pin (in any order) restores the state before it,
    the pin below or no pin. ``.training`` always reads the mode the module runs in. Each
    pinned module carries one forward pre-hook and one ``train`` override however many
    pins it has.

    In ``"train"`` mode a guard checks every batch. PyTorch itself raises only on a
    single value per channel (``N*H*W == 1``); a batch of one ``(1, C, H, W)`` sample
    passes there, and each channel is then normalized over that sample's ``H*W``
    positions alone, as instance norm would. The guard catches both: fewer than
    ``min_batch`` samples, or a single value per channel.

    Args:
        model: the network (wrappers are looked through).
        mode: ``"train"`` (batch statistics, running statistics updated) or ``"eval"``
            (running statistics, never updated).
        small_batch: ``"raise"`` (:class:`InflateError`), ``"warn"`` or ``"ignore"``.
        min_batch: the smallest acceptable batch size in ``"train"`` mode.

    Returns:
        A :class:`BatchNormPin`; call ``.remove()`` or use it in a ``with`` block.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        >>> with pin_batchnorm(net, "eval"):
        ...     _ = net.train()(torch.randn(2, 3, 4, 4))
        ...     print(net[1].num_batches_tracked.item())
        0
        >>> pin = pin_batchnorm(net, "train", small_batch="raise")
        >>> _ = net.eval()(torch.randn(1, 3, 2, 2))
        Traceback (most recent call last):
        ...
        inflate._errors.InflateError: batch norm '1' (BatchNorm2d) pinned to train mode: expected a batch of at least 2 samples, got 1 (shape (1, 4, 2, 2)); each channel would be normalized over the 4 spatial position(s) of that one sample only, as instance norm would, and the running statistics updated from it (min_batch=1 accepts single samples)
        >>> pin.remove()
        >>> with pin_batchnorm(net, "eval"):
        ...     with pin_batchnorm(net, "train", small_batch="ignore"):
        ...         print(net.eval()[1].training)             # the newest pin applies
        ...     print(net.train()[1].training)                # its removal restores the pin below
        True
        False
        >>> net[1].training                                   # unpinned: the model's mode again
        True
    """
    if mode not in _MODES:
        raise InflateError(f"mode: expected one of {_MODES}, got {mode!r}")
    if small_batch not in _ACTIONS:
        raise InflateError(f"small_batch: expected one of {_ACTIONS}, got {small_batch!r}")
    if not isinstance(min_batch, int) or min_batch < 1:
        raise InflateError(f"min_batch: expected an int >= 1, got {min_batch!r}")
    target = unwrap(model)
    found = batch_norms(target)
    pins = {name: _Pin(mode == "train", small_batch, min_batch, name) for name in found}
    for name, module in found.items():
        _push(module, pins[name])
    return BatchNormPin(target, mode, found, pins)


def batch_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``model`` by name: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and their subclasses."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _pin_frozen(model: nn.Module, names: Collection[str]) -> BatchNormPin:
    """Pin the batch norms ``names`` of ``model`` to eval for :func:`inflate.finetune`, once each.

    The pins an earlier call made are replaced: a batch norm not in ``names`` loses its
    finetune pin, one in ``names`` keeps exactly one, at the place in its stack the old
    one had (so a pin the user put on top still applies). Handles of the earlier pins no
    longer remove anything. Pins made by :func:`pin_batchnorm` are not touched.
    """
    target = unwrap(model)
    found = batch_norms(target)
    unknown = sorted(set(names) - set(found))
    if unknown:
        raise InflateError(f"expected names of batch norms of the model, got {unknown}")
    pins: dict[str, _Pin] = {}
    for name, module in found.items():
        stack = module.__dict__.get(_ATTR)
        earlier = [p for p in stack.pins if p.owner == _FINETUNE] if stack is not None else []
        if name in names:
            pins[name] = _Pin(False, "ignore", 1, name, _FINETUNE)
            if stack is not None and earlier:  # take the place of the first earlier pin
                stack.pins[next(i for i, p in enumerate(stack.pins) if p is earlier[0])] = pins[name]
                module.training = stack.pins[-1].training
                earlier = earlier[1:]
            else:
                _push(module, pins[name])
        for pin in earlier:
            _pop(module, pin)
    return BatchNormPin(target, "eval", {n: found[n] for n in pins}, pins)
