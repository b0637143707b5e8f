"""Batch-norm mode pinning, and a guard against batches too small for batch statistics."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

from torch import Tensor, nn

from ._errors import InflateError
from ._tracer import unwrap

__all__ = ["BatchNormPin", "pin_batchnorm"]

_MODES = ("train", "eval")
_ACTIONS = ("raise", "warn", "ignore")


def _enforce(module: nn.Module, args: tuple[Any, ...], *, training: bool, small_batch: str, min_batch: int,
             name: str) -> None:
    """Forward pre-hook: restore the pinned mode, then check the batch if it uses batch statistics."""
    module.training = training
    if not training or small_batch == "ignore" or not args or not isinstance(args[0], Tensor):
        return
    x = args[0]
    values = x.numel() // max(x.shape[1], 1) if x.ndim >= 2 else x.numel()
    batch = x.shape[0] if x.ndim >= 2 else 1
    if values > 1 and batch >= min_batch:
        return
    message = (f"batch norm '{name}' ({type(module).__name__}) pinned to train mode: expected a batch of at "
               f"least {min_batch} samples and more than 1 value per channel, got shape {tuple(x.shape)} "
               f"({values} value(s) per channel); its batch statistics and running statistics come from "
               "too few values")
    if small_batch == "raise":
        raise InflateError(message)
    warnings.warn(message, UserWarning, stacklevel=2)


def _pinned_train(module: nn.Module, mode: bool = True, *, training: bool) -> nn.Module:
    """Stands in for ``module.train``: whatever ``mode`` is asked, keep the pinned one."""
    module.training = training
    return module


class BatchNormPin:
    """Handle of :func:`pin_batchnorm`: ``remove()`` it, or use it as a context manager."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.modules.batchnorm._BatchNorm], mode: str,
                 small_batch: str, min_batch: int) -> None:
        self.model = model
        self.mode = mode
        self.modules = modules
        self._handles = []
        for name, module in modules.items():
            module.training = mode == "train"
            module.train = partial(_pinned_train, module, training=mode == "train")  # type: ignore[method-assign]
            hook = partial(_enforce, training=mode == "train", small_batch=small_batch, min_batch=min_batch,
                           name=name)
            self._handles.append(module.register_forward_pre_hook(hook, prepend=True))

    def remove(self) -> None:
        """Unpin: batch norms follow ``model.train()``/``model.eval()`` again (and the model's mode now)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.modules.values():
            module.__dict__.pop("train", None)
            module.training = self.model.training

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
