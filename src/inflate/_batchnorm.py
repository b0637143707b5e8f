"""Batch-norm mode pinning, and a guard against batches too small for batch statistics."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor, nn

from ._errors import InflateError
from ._tracer import unwrap

__all__ = ["BatchNormPin", "pin_batchnorm"]

_MODES = ("train", "eval")
_ACTIONS = ("raise", "warn", "ignore")
_ATTR = "_inflate_pins"  # the one attribute a pinned batch norm carries: its _PinStack


@dataclass(eq=False)  # pins are told apart by identity: two pins with the same settings are two pins
class _Pin:
    """One pin on one batch norm: the mode it fixes and how its small-batch guard acts."""

    training: bool
    small_batch: str
    min_batch: int
    name: str


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
    values = x.numel() // max(x.shape[1], 1) if x.ndim >= 2 else x.numel()
    batch = x.shape[0] if x.ndim >= 2 else 1
    if values > 1 and batch >= pin.min_batch:
        return
    message = (f"batch norm '{pin.name}' ({type(module).__name__}) pinned to train mode: expected a batch of at "
               f"least {pin.min_batch} samples and more than 1 value per channel, got shape {tuple(x.shape)} "
               f"({values} value(s) per channel); its batch statistics and running statistics come from "
               "too few values")
    if pin.small_batch == "raise":
        raise InflateError(message)
    warnings.warn(message, UserWarning, stacklevel=2)


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

    def __init__(self, model: nn.Module, modules: dict[str, nn.modules.batchnorm._BatchNorm], mode: str,
                 small_batch: str, min_batch: int) -> None:
        self.model = model
        self.mode = mode
        self.modules = modules
        self._pins = {name: _Pin(mode == "train", small_batch, min_batch, name) for name in modules}
        for name, module in modules.items():
            _push(module, self._pins[name])

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

    In ``"train"`` mode a guard checks every batch: fewer than ``min_batch`` samples or
    a single value per channel (``N*H*W == 1``) makes batch statistics meaningless.

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
        >>> _ = net.eval()(torch.randn(1, 3, 1, 1))
        Traceback (most recent call last):
        ...
        inflate._errors.InflateError: batch norm '1' (BatchNorm2d) pinned to train mode: expected a batch of at least 2 samples and more than 1 value per channel, got shape (1, 4, 1, 1) (1 value(s) per channel); its batch statistics and running statistics come from too few values
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
    found = {n: m for n, m in target.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return BatchNormPin(target, found, mode, small_batch, min_batch)
