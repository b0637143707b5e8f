"""Per-channel operands: parameters and buffers applied to the input channel by channel.

A normaliser's mean and std, a batch norm's statistics and affine hold one value per input
channel along one axis. An elementwise operation that applies such a tensor to the input keeps
its channels apart, and the inflated model stays exact if the operand is widened per input as
the first layer's weight is (:class:`PerChannelOperand`, planned by :mod:`inflate._surgery`).

An operand is known by its *root*: a parameter or buffer stand-in, or a tensor that
``torch.as_tensor`` made of a module's list of ``C`` numbers (a *list root*, such as
torchvision's ``image_mean``; every call makes a new tensor of the same list, so it is known by
that attribute). Views, casts and elementwise functions of one root alone stay its *lineage*:
``self.mean.view(1, -1, 1, 1)`` is still the mean. Any other operation that reads a root
without the input is a *plain use*, which a widened operand would break: an operand that has
one is a problem. A step output of a widened operand's lineage changes shape in the inflated
model, so the replay finds out its shape itself (:meth:`Operands.resolve`).

:class:`Operands` keeps this state for :mod:`inflate._discovery`'s tracer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _ops as ops
from ._tags import Channels, Lost
from ._tracer import Tracer

if TYPE_CHECKING:
    from ._discovery import Step

__all__ = ["Operands", "PerChannelOperand"]

#: Functions that build a tensor from Python data: from a module's list of ``C`` numbers, a root.
_FROM_DATA = frozenset((torch.as_tensor, torch.tensor))
_LINEAGE = ("reshape", "permute", "index", "expand", "dtype", "data", "pointwise")


@dataclass(frozen=True)
class PerChannelOperand:
    """A parameter or buffer that an operation applies to the input channel by channel
    (a normaliser's mean and std, a batch norm's statistics and affine): widened per input.

    Attributes:
        name: qualified name of the module that holds it.
        attr: its attribute name there.
        axis: its axis that runs over the input channels.
    """

    name: str
    attr: str
    axis: int


class Operands:
    """Roots, their lineage and plain uses, and the per-channel operands accepted.

    Args:
        tracer: the tracer being run: its parameter and buffer owners, module names, the
            input's channel count and the modules being called (read as the trace goes,
            since some are set after).
    """

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.derived: dict[int, tuple[Tensor, Tensor]] = {}  # views of parameters and buffers -> their root
        self.accepted: dict[Hashable, tuple[Tensor, PerChannelOperand]] = {}  # per-channel operands, by root key
        self.plain_uses: set[Hashable] = set()  # keys of roots read by operations that do not involve the input
        self.lists: dict[int, tuple[Tensor, tuple[str, str]]] = {}  # tensors made of a module's list

    @property
    def channels(self) -> int:
        """``C``, the channel count of the input being traced."""
        return self.tracer.channels  # type: ignore[attr-defined] - the discovery tracer's

    def list_owner(self, func: Callable[..., Any], args: Any) -> tuple[str, str] | None:
        """The module attribute that holds the list ``torch.as_tensor(values)`` reads, if it is
        ``C`` numbers (torchvision's ``image_mean``): a per-channel root like a buffer."""
        if func not in _FROM_DATA:
            return None
        values = args[0] if args else None
        if type(values) not in (list, tuple) or len(values) != self.channels \
                or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            return None
        for module in reversed(self.tracer.objects):
            attr = next((k for k, v in vars(module).items() if v is values), None)
            if attr is not None:
                return self.tracer.modules.get(id(module), "?"), attr
        return None

    def see(self, kind: str | None, operands: list[Tensor], tagged: bool, out: Any,
            owner: tuple[str, str] | None) -> None:
        """After an operation: a list root made (``owner``, from :meth:`list_owner`), and
        the lineage of the roots among its operands."""
        if owner is not None and isinstance(out, Tensor):
            self.lists[id(out)] = (out, owner)
        self._lineage(kind, operands, tagged, out)

    def key(self, root: Tensor) -> Hashable:
        """What a root stands for: its id, or for tensors made of a module's list, that
        attribute (each ``torch.as_tensor(self.image_mean)`` is a new tensor of one list)."""
        listed = self.lists.get(id(root))
        return ("list", *listed[1]) if listed is not None and listed[0] is root else id(root)

    def key_of(self, t: Tensor) -> Hashable | None:
        """The key of the parameter or buffer ``t`` is a view of (None: none)."""
        root = self.root(t)
        return self.key(root) if root is not None else None

    def root(self, t: Tensor) -> Tensor | None:
        """The parameter or buffer stand-in ``t`` is, or is a view or cast of."""
        if id(t) in self.tracer.owners or id(t) in self.tracer.buffer_owners:
            return t
        listed = self.lists.get(id(t))
        if listed is not None and listed[0] is t:
            return t
        entry = self.derived.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def _lineage(self, kind: str | None, operands: list[Tensor], tagged: bool, out: Any) -> None:
        """Views, casts and elementwise functions of one parameter or buffer stay its views;
        any other operation that reads one without the input is a plain use."""
        roots = [r for r in map(self.root, operands) if r is not None]
        if not roots:
            return
        src = operands[0]
        results = ops.tensors(out)
        if kind in _LINEAGE and len(results) == 1 and self.root(src) is not None and (
                kind in ("dtype", "data") or not tagged and all(t is src or t.numel() == 1 for t in operands)):
            self.derived[id(results[0])] = (results[0], self.root(src))
            return
        if not tagged:
            self.plain_uses.update(self.key(r) for r in roots)

    def per_channel(self, t: Tensor, axis: int) -> bool:
        """Accept (and record) ``t`` as a per-channel operand of the input if it is a
        parameter or buffer, or a view of one, with exactly one axis of length ``C``."""
        root = self.root(t)
        if root is None:
            return False
        axes = [d for d, size in enumerate(root.shape) if size == self.channels]
        listed = self.lists.get(id(root))
        entries = self.tracer.owners.get(id(root)) or self.tracer.buffer_owners.get(id(root)) \
            or ([listed[1]] if listed else [])
        if len(axes) != 1 or len(entries) != 1:
            return False
        name, attr = entries[0]
        self.accepted.setdefault(self.key(root), (root, PerChannelOperand(name, attr, axes[0])))
        return True

    def widened(self) -> list[PerChannelOperand]:
        """The operands accepted, each once, in the order first seen."""
        return list(dict.fromkeys(operand for _, operand in self.accepted.values()))

    def resolve(self, steps: list[Step]) -> None:
        """Replace the root keys in the steps' outputs: views of widened operands are lost
        (their shapes are the replay's to find out), those of others are untagged."""
        for i, step in enumerate(steps):
            if any(_is_key(mark) for _, mark in step.outs):
                outs = [(shape, Lost("a view of a per-channel operand") if mark in self.accepted else None)
                        if _is_key(mark) else (shape, mark) for shape, mark in step.outs]
                steps[i] = dataclasses.replace(step, outs=outs)

    def problems(self) -> list[str]:
        """One problem for each accepted operand that also has a plain use."""
        return [f"'{operand.name + '.' if operand.name else ''}{operand.attr}' is applied to the input channel by "
                "channel and also read by other operations: widening it per input would break those"
                for key, (_, operand) in self.accepted.items() if key in self.plain_uses]


def _is_key(mark: Any) -> bool:
    """A root's key in a step's outputs, rather than a tag or nothing."""
    return mark is not None and not isinstance(mark, (Channels, Lost))
