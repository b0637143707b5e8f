"""Layer listing in forward order, and fine-tuning policies that say what stays trainable."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from . import _ops as ops
from ._batchnorm import BatchNormPin, _pin_frozen, batch_norms
from ._errors import InflateError
from ._tracer import Owners, Tracer, trace, unwrap

__all__ = ["Layer", "FinetuneReport", "layers", "trace_layers", "finetune", "check_optimizer", "POLICIES"]

#: Named policies: positions in :func:`layers` that stay trainable.
POLICIES: dict[str, tuple[int, ...] | None] = {
    "last": (-1,),
    "first+last": (0, -1),
    "first+second+last": (0, 1, -1),
    "all": None,
}
Policy = Union[str, Sequence[Union[int, str]]]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.lower().endswith(("norm", "norm1d", "norm2d",
                                                                                "norm3d", "normact2d"))


@dataclass
class Layer:
    """One trainable unit: a weight layer and the normalization layers attached to it.

    Attributes:
        name: module name, or the parameter name for a parameter held directly by a
            container module (e.g. ViT's ``cls_token``).
        params: qualified names of its parameters, its norms' included.
        norms: module names of the normalization layers attached to it.
    """

    name: str
    params: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)


class _OrderTracer(Tracer):
    """Records the order in which parameters are first used by any tensor operation."""

    def __init__(self, owners: Owners, modules: dict[int, str]) -> None:
        super().__init__(owners, modules)
        self.order: dict[int, None] = {}

    def before(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> None:
        for t in ops.tensors((args, kwargs)):
            if id(t) in self.owners:
                self.order.setdefault(id(t), None)


def trace_layers(model: nn.Module, example_input: Tensor | None = None) -> list[Layer]:
    """The :class:`Layer` units of ``model`` in forward execution order (see :func:`layers`)."""
    model = unwrap(model)
    tracer = trace(model, example_input, _OrderTracer)
    modules = dict(model.named_modules())
    owns_params = {n for n, m in modules.items() if any(True for _ in m.parameters(recurse=False))}
    units: dict[str, Layer] = {}
    previous: Layer | None = None
    pending_norms: dict[str, list[str]] = {}  # norms met before any weight layer: module -> params
    for pid in tracer.order:
        mod_name, attr = tracer.owners[pid][0]
        full = f"{mod_name}.{attr}" if mod_name else attr
        module = modules[mod_name]
        container = any(c.startswith(mod_name + ".") or not mod_name for c in owns_params if c != mod_name)
        if _is_norm(module) and not container:
            if previous is None:
                pending_norms.setdefault(mod_name, []).append(full)
            elif mod_name in previous.norms:
                previous.params.append(full)
            else:
                previous.norms.append(mod_name)
                previous.params.append(full)
            continue
        key = full if container else mod_name
        unit = units.setdefault(key, Layer(key))
        unit.params.append(full)
        for norm, params in pending_norms.items():  # norms before the first weight layer join it
            unit.norms.append(norm)
            unit.params.extend(params)
        pending_norms.clear()
        previous = unit
    return list(units.values())


def layers(model: nn.Module, example_input: Tensor | None = None) -> list[str]:
    """The model's weight layers in forward execution order, found by tracing on the meta device.

    A layer is a module that holds parameters (a parameter held directly by a
    container module, like ViT's ``cls_token``, is a layer of its own), placed where
    its first parameter is first used. Each normalization layer is attached to the
    weight layer that runs before it and is not listed. "first", "second" and "last"
    in :func:`finetune` policies mean positions in this list.

    Args:
        model: the network (wrappers are looked through).
        example_input: a tensor the model accepts; only its shape and dtype are used.

    Returns:
        Layer names.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
        >>> layers(net)
        ['0', '3']
    """
    return [layer.name for layer in trace_layers(model, example_input)]


def _select(units: list[Layer], policy: Policy) -> list[Layer]:
    names = [u.name for u in units]
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise InflateError(f"policy: expected one of {list(POLICIES)} or a list, got {policy!r}")
        positions = POLICIES[policy]
        if positions is None:
            return list(units)
        entries: Sequence[int | str] = positions
    else:
        entries = list(policy)
    chosen: dict[str, None] = {}
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            if not -len(units) <= entry < len(units):
                raise InflateError(f"policy: position {entry} is out of range for {len(units)} layers")
            chosen[names[entry]] = None
        elif isinstance(entry, str):
            matched = [entry] if entry in names else [n for n in names if re.fullmatch(entry, n)]
            if not matched:
                raise InflateError(f"policy: {entry!r} matches no layer; layers are {names}")
            chosen.update(dict.fromkeys(matched))
        else:
            raise InflateError(f"policy: expected int positions or str names/patterns, got {entry!r}")
    return [u for u in units if u.name in chosen]


@dataclass
class FinetuneReport:
    """What :func:`finetune` made trainable, and which batch norms it pinned; ``str()`` is a table.

    Attributes:
        rows: every layer as ``(position, name, parameters, trainable)``.
        trainable: the number of trainable parameters.
        total: the number of parameters.
        pin: the ``"eval"`` pins on the frozen batch norms (``pin.remove()`` lifts them);
            empty with ``freeze_batchnorm=False``.
    """

    rows: list[tuple[int, str, int, bool]]  # (position, layer, parameters, trainable)
    trainable: int
    total: int
    pin: BatchNormPin | None = None

    @property
    def share(self) -> float:
        """Fraction of all parameters that are trainable."""
        return self.trainable / self.total if self.total else 0.0

    @property
    def pinned(self) -> list[str]:
        """Names of the frozen batch norms pinned to eval mode."""
        return list(self.pin.modules) if self.pin is not None else []

    def __str__(self) -> str:
        width = max([len(r[1]) for r in self.rows if r[3]] + [5])
        lines = [f"{'#':>4}  {'layer':<{width}}  {'params':>12}"]
        lines += [f"{pos:>4}  {name:<{width}}  {count:>12,}" for pos, name, count, on in self.rows if on]
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({self.share:.2%})")
        if self.pinned:
            lines.append(f"frozen batch norms pinned to eval: {len(self.pinned)}")
        return "\n".join(lines)


def finetune(model: nn.Module, policy: Policy, *, example_input: Tensor | None = None,
             freeze_batchnorm: bool = True) -> FinetuneReport:
    """Make only the layers named by ``policy`` trainable, and keep the rest truly frozen.

    Frozen parameters lose ``requires_grad`` and any ``.grad`` they had, so optimizers
    with momentum or weight decay cannot move them (they skip parameters whose ``.grad``
    is None). Normalization layers follow the layer they are attached to (see
    :func:`layers`). ``requires_grad`` does not stop a batch norm in train mode from
    updating its running statistics, so every batch norm whose parameters are all frozen
    is pinned to eval mode (:func:`inflate.pin_batchnorm`'s pins), through any
    ``model.train()``. Calling ``finetune`` again replaces the pins the earlier call made:
    a batch norm that becomes trainable is unpinned, one that stays frozen keeps one pin.
    Pins made with :func:`inflate.pin_batchnorm` are left alone. Batch norms without
    parameters (``affine=False``) have nothing to freeze and are not pinned.

    Args:
        model: the network (changed in place).
        policy: ``"last"``, ``"first+last"``, ``"first+second+last"``, ``"all"``, or a
            list of positions (``0``, ``-1``), layer names, or regular expressions that
            must match whole names (as PEFT's ``target_modules``).
        example_input: a tensor the model accepts; only its shape and dtype are used.
        freeze_batchnorm: pin the frozen batch norms to eval mode. ``False`` pins none
            (and lifts the pins of an earlier call): their running statistics then
            follow ``model.train()``.

    Returns:
        A report; ``print(report)`` shows the trainable layers and the share trained,
        ``report.pinned`` the pinned batch norms.

    Raises:
        InflateError: an unknown policy, a position out of range, a name or pattern that
            matches nothing, or a policy that would freeze everything.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1))
        >>> report = finetune(net, "first+last")
        >>> print(report)
           #  layer        params
           0  0               240
           2  3                18
        trainable 258 of 842 parameters (30.64%)
        >>> report.pinned                     # the norm of layer 0 trains: nothing to pin
        []
        >>> finetune(net, "last").pinned      # now it is frozen, and stays in eval mode
        ['1']
        >>> net.train()[1].training
        False
    """
    if not isinstance(freeze_batchnorm, bool):
        raise InflateError(f"freeze_batchnorm: expected True or False, got {freeze_batchnorm!r}")
    target = unwrap(model)
    units = trace_layers(target, example_input)
    chosen = {u.name for u in _select(units, policy)}
    if not chosen:
        raise InflateError(f"policy: expected at least one trainable layer, got none from {policy!r}")
    params = dict(target.named_parameters())
    trainable_names = {p for u in units if u.name in chosen for p in u.params}
    if policy == "all":
        trainable_names = set(params)
    for name, p in params.items():
        p.requires_grad_(name in trainable_names)
        if name not in trainable_names:
            p.grad = None
    frozen_norms = [n for n, m in batch_norms(target).items()
                    if freeze_batchnorm and any(True for _ in m.parameters())
                    and not any(p.requires_grad for p in m.parameters())]
    pin = _pin_frozen(target, frozen_norms)
    rows = [(i, u.name, sum(params[p].numel() for p in u.params), u.name in chosen) for i, u in enumerate(units)]
    total = sum(p.numel() for p in params.values())
    return FinetuneReport(rows, sum(params[n].numel() for n in trainable_names), total, pin)


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise if ``optimizer`` holds frozen or foreign parameters, or misses trainable ones.

    Foreign parameters are typically the old weights of layers that
    :func:`inflate.inflate_first_conv` replaced after the optimizer was built.

    Raises:
        InflateError: naming the parameters on each side of the mismatch.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> _ = finetune(net, "last")
        >>> check_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.1))
        Traceback (most recent call last):
        ...
        inflate._errors.InflateError: optimizer: expected only trainable parameters, found 2 frozen: ['0.weight', '0.bias']
    """
    params = dict(unwrap(model).named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(1 for p in held if id(p) not in by_id)
    frozen = [by_id[id(p)] for p in held if id(p) in by_id and not p.requires_grad]
    missing = [n for n, p in params.items() if p.requires_grad and id(p) not in {id(h) for h in held}]
    if foreign:
        raise InflateError(f"optimizer: expected parameters of the model, found {foreign} that are not (was it "
                           "built before inflate_first_conv replaced the input layers?)")
    if frozen:
        raise InflateError(f"optimizer: expected only trainable parameters, found {len(frozen)} frozen: {frozen}")
    if missing:
        raise InflateError(f"optimizer: expected every trainable parameter, {len(missing)} missing: {missing}")
