"""Which layers read the model input, found by following the data.

The model runs once on the **meta device** (shapes only: no memory, no real
compute; see :mod:`inflate._tracer`); the model itself is never copied or
changed. A :class:`~torch.overrides.TorchFunctionMode` tags the input and
follows its channel axis through every operation (:mod:`inflate._ops`).
Every convolution or linear layer that receives a tagged tensor reads the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from . import _ops as dataflow
from ._ops import Channels, Lost, Tag
from ._errors import InflateError
from ._tracer import Owners, Tracer, trace, unwrap
from .rules import KernelLayout

__all__ = ["InputLayer", "Discovery", "discover", "find_input_layers"]


@dataclass(frozen=True)
class InputLayer:
    """A layer that reads the model input.

    Attributes:
        name: qualified module name (as in ``model.named_modules()``).
        param: attribute of the module that holds the weight.
        layout: where the input channels sit in the weight.
        channels: ``C``, the channel count of the input it reads.
    """

    name: str
    param: str
    layout: KernelLayout
    channels: int


@dataclass
class Discovery:
    """What one traced forward pass found."""

    layers: list[InputLayer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def raise_problems(self) -> None:
        """Raise :class:`InflateError` listing every problem, if there are any."""
        if self.problems:
            raise InflateError("cannot inflate exactly:\n  - " + "\n  - ".join(dict.fromkeys(self.problems)))


class _InputTracer(Tracer):
    """Tags the input and follows its channel axis to the layers that read it."""

    def __init__(self, owners: Owners, modules: dict[int, str]) -> None:
        super().__init__(owners, modules)
        self.channels = 0
        self.tags: dict[int, tuple[Tensor, Tag]] = {}  # keeps tensors alive so ids stay unique
        self.found: dict[str, InputLayer] = {}
        self.elsewhere: set[str] = set()  # input layers whose weight also reads other tensors
        self.problems: list[str] = []

    def start(self, x: Tensor) -> None:
        self.channels = int(x.shape[1])
        self.mark(x, Channels(1))

    def finish(self, out: Any) -> None:
        for t in dataflow._tensors(out):
            tag = self.tag(t)
            if tag is not None:
                how = tag.why if isinstance(tag, Lost) else "channel-wise operations only"
                self.problems.append(f"the model output depends on the input through {how}, not through a "
                                     "layer inflate can widen")

    def tag(self, tensor: Tensor) -> Tag | None:
        entry = self.tags.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def mark(self, tree: Any, tag: Tag) -> None:
        for t in dataflow._tensors(tree):
            self.tags[id(t)] = (t, tag)

    def where(self) -> str:
        return f" in {self.stack[-1]}" if self.stack else ""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in dataflow.CONSUMERS:
            self._consume(name, args, kwargs)
            return self.call(func, args, kwargs)  # a weight layer's output no longer carries input channels
        out = self.call(func, args, kwargs)
        tags = self.tags
        operands = dataflow._tensors(args)
        if kwargs:
            operands += dataflow._tensors(kwargs)
        for t in operands:  # most operations meet no tagged tensor: leave as soon as that is known
            if id(t) in tags:
                break
        else:
            return out
        if dataflow.is_fresh(func) or not dataflow._tensors(out):
            return out
        seen = [self.tag(t) for t in operands]
        if any(t is not None for t in seen):
            tag = dataflow.propagate(func, args, kwargs, out, self.tag, self.channels)
            if isinstance(tag, Lost) and tag not in seen:  # lost here: say where
                tag = Lost(tag.why + self.where())
            if tag is not None:
                self.mark(out, tag)
        return out

    def _consume(self, name: str, args: Any, kwargs: Any) -> None:
        kind, spatial = dataflow.CONSUMERS[name]
        x = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        owners = self.owners.get(id(weight), [])
        tag = self.tag(x) if isinstance(x, Tensor) else None
        if tag is None:
            self.elsewhere.update(o[0] for o in owners)
            return
        where = self.stack[-1] if self.stack else "<functional call>"
        if isinstance(tag, Lost):
            self.problems.append(f"layer {where} reads the input only after {tag.why}, which mixes or "
                                 "transforms channels in a way inflate cannot follow")
            return
        if not owners or "parametrizations" in owners[0][0].split("."):
            self.problems.append(
                f"layer {where} computes its {name} weight during forward (weight standardization, weight "
                "norm or a parametrization): widening the stored weight would not give an exact model"
            )
            return
        if len(owners) > 1:
            self.problems.append(f"layer '{owners[0][0]}' shares its weight with " +
                                 ", ".join(f"'{o[0]}'" for o in owners[1:]))
            return
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        channel_axis = x.ndim - 1 if kind == "linear" else x.ndim - spatial - 1
        if tag.dim != channel_axis:
            self.problems.append(f"layer {where} reads the input with its channels moved to axis {tag.dim} "
                                 f"of shape {tuple(x.shape)}, expected axis {channel_axis}")
            return
        layout = KernelLayout(kind, groups=int(groups), outer=tag.outer, inner=tag.inner)
        channels = self.channels
        module_name, attr = owners[0]
        layer = InputLayer(module_name, attr, layout, channels)
        if self.found.setdefault(module_name, layer) != layer:
            self.problems.append(f"layer '{module_name}' reads the input in two different layouts")


def discover(model: nn.Module, example_input: Tensor | None = None) -> Discovery:
    """Trace ``model`` once (see :mod:`inflate._tracer`) and report the layers that read its input.

    Raises:
        InflateError: the model cannot be run on the example input, or is lazy.
    """
    model = unwrap(model)
    tracer = trace(model, example_input, _InputTracer)
    if tracer.problems:  # trace again with module hooks, to say where each problem is
        tracer = trace(model, example_input, _InputTracer, stack=True)
    found = Discovery(list(tracer.found.values()), list(tracer.problems))
    for layer in found.layers:
        if layer.name in tracer.elsewhere:
            found.problems.append(f"layer '{layer.name}' reads the input and also other tensors: widening it "
                                  "would break those other uses")
    if not found.layers and not found.problems:
        found.problems.append("no Conv or Linear layer reads the input")
    return found


def find_input_layers(model: nn.Module, example_input: Tensor | None = None) -> list[str]:
    """Qualified names of the layers that read the model input, in forward order.

    Args:
        model: any module; ``DataParallel``/DDP/``torch.compile`` wrappers are looked through.
        example_input: a tensor ``(B, C, ...)`` the model accepts; only its shape and
            dtype matter. By default ``C`` is taken from the first conv layer and the
            spatial size from a timm ``pretrained_cfg`` (else 224).

    Returns:
        Names as in ``model.named_modules()`` of the unwrapped model.

    Raises:
        InflateError: some layer reads the input in a way that cannot be inflated
            exactly (the message lists every such place), or the model cannot run.

    Example:
        >>> import torch.nn as nn
        >>> from inflate import find_input_layers
        >>> class TwoBranch(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        ...     def forward(self, x):
        ...         return self.a(x) + self.b(x)
        >>> find_input_layers(TwoBranch())
        ['a', 'b']
    """
    found = discover(model, example_input)
    found.raise_problems()
    return [layer.name for layer in found.layers]
