"""Layer-wise schedules: learning rates that decay towards the input, and gradual unfreezing.

Both read the layers of :func:`inflate.layers` (forward order, norms attached) and
work with any :mod:`torch.optim` optimizer, in a plain PyTorch training loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import InflateError
from ._finetune import FinetuneReport, Policy, _is_norm, _select, finetune, trace_layers
from ._tracer import unwrap

__all__ = ["param_groups", "Unfreezer"]


def _number(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
            expected: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        raise InflateError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def param_groups(model: nn.Module, lr: float, *, decay: float = 1.0, weight_decay: float = 0.0,
                 example_input: Tensor | None = None) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise learning rates, for any :mod:`torch.optim` optimizer.

    The last of the ``L`` layers of :func:`inflate.layers` trains at ``lr``, layer ``i``
    at ``lr * decay ** (L - 1 - i)``: layer-wise rate decay (timm's ``layer_decay``,
    fastai's discriminative rates, LLRD). Only trainable parameters (``requires_grad``)
    are included, each once. Biases, other 1-d parameters and the parameters of
    normalization layers get no weight decay (timm's convention); with
    ``weight_decay > 0`` they form a group of their own per layer. Every group has a
    ``name`` key (the layer, and ``"no_weight_decay"`` for the group without it); layers
    are never merged, even when their rates are equal. Trainable parameters the forward
    pass does not use form a last group, ``"untraced"``, at ``lr``.

    Args:
        model: the network (wrappers are looked through).
        lr: the learning rate of the last layer, > 0.
        decay: the factor per layer towards the input, in ``(0, 1]``; 1 gives every
            layer ``lr``.
        weight_decay: the weight decay of weights, >= 0. Every group sets its own, so
            the optimizer's default is not used.
        example_input: a tensor the model accepts; only its shape and dtype are used.

    Returns:
        A list of dicts with ``params``, ``lr``, ``weight_decay`` and ``name``, in layer order.

    Raises:
        InflateError: an argument out of range, or no trainable parameter.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1))
        >>> groups = param_groups(net, 0.1, decay=0.5, weight_decay=0.05)
        >>> for g in groups:
        ...     print(g["name"], g["lr"], g["weight_decay"], len(g["params"]))
        0 0.025 0.05 1
        0 no_weight_decay 0.025 0.0 3
        2 0.05 0.05 1
        2 no_weight_decay 0.05 0.0 1
        3 0.1 0.05 1
        3 no_weight_decay 0.1 0.0 1
        >>> optimizer = torch.optim.AdamW(groups)
    """
    lr = _number("lr", lr, low=0.0, low_open=True, expected="a learning rate > 0")
    decay = _number("decay", decay, low=0.0, high=1.0, low_open=True, expected="a factor in (0, 1]")
    weight_decay = _number("weight_decay", weight_decay, low=0.0, expected="a number >= 0")
    target = unwrap(model)
    units = trace_layers(target, example_input)
    named = dict(target.named_parameters())
    norms = {n for n, m in target.named_modules() if _is_norm(m)}
    seen: set[int] = set()
    groups: list[dict[str, Any]] = []

    def add(name: str, rate: float, params: list[tuple[str, nn.Parameter]]) -> None:
        fresh = [(n, p) for n, p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for _, p in fresh)
        exempt = [p for n, p in fresh if p.ndim <= 1 or n.rpartition(".")[0] in norms]
        decayed = [p for _, p in fresh if id(p) not in {id(q) for q in exempt}]
        if weight_decay == 0.0:
            decayed, exempt = decayed + exempt, []
        for suffix, members, wd in (("", decayed, weight_decay), (" no_weight_decay", exempt, 0.0)):
            if members:
                groups.append({"params": members, "lr": rate, "weight_decay": wd, "name": name + suffix})

    for i, unit in enumerate(units):
        add(unit.name, lr * decay ** (len(units) - 1 - i), [(n, target.get_parameter(n)) for n in unit.params])
    add("untraced", lr, list(named.items()))  # trainable parameters the forward pass never used
    if not groups:
        raise InflateError("expected at least one trainable parameter (requires_grad), found none; "
                           "see inflate.finetune")
    return groups


class Unfreezer:
    """Gradual unfreezing in a plain PyTorch loop: a ``{epoch: policy}`` schedule.

    ``step(epoch)`` applies, in order, every policy of the schedule due by ``epoch``
    that was not applied yet, with :func:`inflate.finetune`, and adds the parameters
    that became trainable to ``optimizer`` with ``add_param_group``, in layer-wise
    groups (:func:`param_groups`). The optimizer's existing groups and its state (momenta,
    Adam's moments) are untouched; a parameter it holds already is never added again.
    Calling ``step`` again for the same epoch, or an earlier one, does nothing.

    To resume, rebuild the model and the optimizer as at the start, then
    ``load_state_dict`` the unfreezer (it re-applies the policies and adds the same
    groups, in the same order), and only then the optimizer's state dict, which
    expects those groups.

    An :mod:`torch.optim.lr_scheduler` made before the new groups were added does not
    schedule them; make it afterwards, or schedule the rate yourself.

    Args:
        model: the network (changed in place).
        optimizer: any :mod:`torch.optim` optimizer over the parameters trainable so far.
        schedule: ``{epoch: policy}``, epochs >= 0, policies as :func:`inflate.finetune`
            takes them; each is checked against the model here, before anything changes.
        lr: the rate of the last layer in the groups added; default the optimizer's
            ``lr``.
        decay: the layer-wise factor of :func:`param_groups`.
        weight_decay: the weight decay of the weights added; default the optimizer's.
        example_input: a tensor the model accepts; only its shape and dtype are used.
        freeze_batchnorm: passed to :func:`inflate.finetune`.

    Raises:
        InflateError: an argument out of range, or a policy that does not fit the model.

    Example:
        >>> import torch, torch.nn as nn
        >>> from inflate import finetune
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> _ = finetune(net, "last")
        >>> optimizer = torch.optim.Adam(param_groups(net, 1e-3))
        >>> unfreezer = Unfreezer(net, optimizer, {0: "last", 2: [1, 2], 4: "all"}, decay=0.5)
        >>> for epoch in range(5):
        ...     _ = unfreezer.step(epoch)
        ...     print(epoch, [(g["name"], g["lr"]) for g in optimizer.param_groups])
        0 [('4', 0.001)]
        1 [('4', 0.001)]
        2 [('4', 0.001), ('2', 0.0005)]
        3 [('4', 0.001), ('2', 0.0005)]
        4 [('4', 0.001), ('2', 0.0005), ('0', 0.00025)]
        >>> unfreezer.state_dict()
        {'applied': [[0, 'last'], [2, [1, 2]], [4, 'all']]}
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Mapping[int, Policy], *,
                 lr: float | None = None, decay: float = 1.0, weight_decay: float | None = None,
                 example_input: Tensor | None = None, freeze_batchnorm: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InflateError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(schedule, Mapping) or not schedule:
            raise InflateError(f"schedule: expected a non-empty {{epoch: policy}} mapping, got {schedule!r}")
        bad = [k for k in schedule if not isinstance(k, int) or isinstance(k, bool) or k < 0]
        if bad:
            raise InflateError(f"schedule: expected epochs as ints >= 0, got {bad}")
        lr = optimizer.defaults.get("lr") if lr is None else lr
        weight_decay = optimizer.defaults.get("weight_decay", 0.0) if weight_decay is None else weight_decay
        self.lr = _number("lr", lr, low=0.0, low_open=True, expected="a learning rate > 0")
        self.decay = _number("decay", decay, low=0.0, high=1.0, low_open=True, expected="a factor in (0, 1]")
        self.weight_decay = _number("weight_decay", weight_decay, low=0.0, expected="a number >= 0")
        if not isinstance(freeze_batchnorm, bool):
            raise InflateError(f"freeze_batchnorm: expected True or False, got {freeze_batchnorm!r}")
        units = trace_layers(model, example_input)
        for epoch in sorted(schedule):
            try:
                chosen = _select(units, schedule[epoch])
            except InflateError as error:
                raise InflateError(f"schedule at epoch {epoch}: {error}") from error
            if not chosen:
                raise InflateError(f"schedule at epoch {epoch}: expected at least one trainable layer, got none "
                                   f"from {schedule[epoch]!r}")
        self.model = model
        self.optimizer = optimizer
        self.schedule = dict(sorted(schedule.items()))
        self.example_input = example_input
        self.freeze_batchnorm = freeze_batchnorm
        self.applied: list[int] = []  # epochs of the schedule whose policy was applied, in order

    def step(self, epoch: int) -> FinetuneReport | None:
        """Apply the policies due by ``epoch`` that were not applied yet; call it as each epoch begins.

        Returns:
            The report of the last policy applied, or None when nothing was due.
        """
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise InflateError(f"epoch: expected an int >= 0, got {epoch!r}")
        last = self.applied[-1] if self.applied else -1
        report = None
        for key in [k for k in self.schedule if last < k <= epoch]:
            report = self._apply(key)
        return report

    def _apply(self, key: int) -> FinetuneReport:
        report = finetune(self.model, self.schedule[key], example_input=self.example_input,
                          freeze_batchnorm=self.freeze_batchnorm)
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        trainable = [p for p in unwrap(self.model).parameters() if p.requires_grad and id(p) not in held]
        if trainable:
            new = {id(p) for p in trainable}
            for group in param_groups(self.model, self.lr, decay=self.decay, weight_decay=self.weight_decay,
                                      example_input=self.example_input):
                group["params"] = [p for p in group["params"] if id(p) in new]
                if group["params"]:
                    self.optimizer.add_param_group(group)
        self.applied.append(key)
        return report

    def state_dict(self) -> dict[str, Any]:
        """The policies applied so far, as ``{"applied": [[epoch, policy], ...]}`` (plain lists and strings)."""
        return {"applied": [[key, _plain(self.schedule[key])] for key in self.applied]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Re-apply the policies ``state`` records, adding the same groups to the optimizer.

        Call it before ``optimizer.load_state_dict``. The schedule must agree with the
        one the state was saved with, for the epochs applied.

        Raises:
            InflateError: the state does not match this schedule or what was applied here already.
        """
        try:
            saved = [(int(key), policy) for key, policy in state["applied"]]
        except (KeyError, TypeError, ValueError) as error:
            raise InflateError(f"state: expected {{'applied': [[epoch, policy], ...]}}, got {state!r}") from error
        for key, policy in saved:
            if key not in self.schedule or _plain(self.schedule[key]) != policy:
                raise InflateError(f"state: expected the schedule it was saved with, got {self.schedule.get(key)!r} "
                                   f"at epoch {key} where it applied {policy!r}")
        if [k for k, _ in saved[:len(self.applied)]] != self.applied:
            raise InflateError(f"state: expected a continuation of the epochs applied here ({self.applied}), "
                               f"got {[k for k, _ in saved]}")
        for key, _ in saved[len(self.applied):]:
            self._apply(key)


def _plain(policy: Policy) -> str | list[int | str]:
    return policy if isinstance(policy, str) else list(policy)
