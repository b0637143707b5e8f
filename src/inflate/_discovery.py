"""Which layers read the model input, found by following the data.

The model runs once on the **meta device** (shapes only: no memory, no real
compute; see :mod:`inflate._tracer`); the model itself is never copied or
changed. A :class:`~torch.overrides.TorchFunctionMode` tags the input and follows
its channel axis through every operation (the op table, :mod:`inflate._ops`),
in-place writes into views of it included. Every convolution or linear layer that
receives a tagged tensor reads the input. Whatever would make an inflated model
differ is a problem: a layer that reads the input after its channels were mixed,
an input-derived value that reaches the output other than through such a layer,
or one that escapes into Python (``item``, ``bool``, ``tolist`` ...).

Every operation is also recorded (:class:`Step`), so that :mod:`inflate._verify`
can replay the inflated model against it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from . import _ops as ops
from . import _rewrites as rewriting
from . import _tags as tags
from ._blanks import Blanks, storage
from ._call import Call, Example
from ._errors import InexactError
from ._operands import Operands, PerChannelOperand
from ._tags import Channels, Lost, Tag
from ._tracer import Owners, Stop, Tracer, trace, unwrap
from .rules import KernelLayout

__all__ = ["Discovery", "InputLayer", "Step", "discover", "find_input_layers"]

_REPORT = ("if it treats every channel alike and keeps them apart, please report it on the torch-inflate issue "
           "tracker so that it joins inflate's op table")


@dataclass(frozen=True)
class InputLayer:
    """A layer that reads the model input.

    Attributes:
        name: qualified module name (as in ``model.named_modules()``).
        param: attribute of the module that holds the weight.
        layout: where the input channels sit in the weight.
        channels: ``C``, the channel count of the input it reads (with ``unit``: the
            channels of its kernel, ``per_unit`` per ``unit`` input channels).
        unit: for a conv inside a stem that reads each input on its own (see
            :mod:`inflate._rewrites`: CSATv2's YCbCr DCT stem converts each 3 channels
            together, a ``MixedConv2d`` splits each input's ``C``), the input channels it
            reads as one; None when its kernel's channels are the input's.
        per_unit: the kernel channels that stand for one ``unit`` (1 for each of
            CSATv2's convs, a block of ``layout.inner`` coefficients; a ``MixedConv2d``
            conv's share of the split).
    """

    name: str
    param: str
    layout: KernelLayout
    channels: int
    unit: int | None = None
    per_unit: int = 1

    @property
    def input_channels(self) -> int:
        """``C``, the channel count of the model input."""
        return self.channels // self.per_unit * self.unit if self.unit else self.channels


@dataclass(frozen=True)
class Step:
    """One operation of the traced forward, as the replay of the inflated model must see it.

    Attributes:
        func: the function object.
        atoms: its non-tensor arguments (:func:`inflate._ops.atoms`).
        outs: shape and tag of each output tensor.
        kind: the op table's kind (None: unknown).
        widened: a weight layer that reads the input (its weight and ``groups`` change).
        where: the module it ran in.
    """

    func: Callable[..., Any]
    atoms: list[Any]
    outs: list[tuple[tuple[int, ...], Tag | None]]
    kind: str | None
    widened: bool
    where: str


@dataclass
class Discovery:
    """What one traced forward pass found, and what it saw on the way."""

    layers: list[InputLayer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    replay_until: int | None = None  # index in ``steps`` after which nothing depends on C (None: the end)
    call: Call | None = None  # the call the trace ran (meta, or the real example)
    operands: list[PerChannelOperand] = field(default_factory=list)

    def raise_problems(self) -> None:
        """Raise :class:`InexactError` listing every problem, if there are any."""
        if self.problems:
            raise InexactError("cannot inflate exactly:\n  - " + "\n  - ".join(dict.fromkeys(self.problems)))


class _InputTracer(Tracer):
    """Tags the input and follows its channel axis to the layers that read it."""

    def __init__(self, owners: Owners, modules: dict[int, str]) -> None:
        super().__init__(owners, modules)
        self.channels = 0
        self.tags: dict[int, tuple[Tensor, Tag]] = {}  # keeps tensors alive so ids stay unique
        self.found: dict[str, InputLayer] = {}
        self.elsewhere: set[str] = set()  # input layers whose weight also reads other tensors
        self.problems: list[str] = []
        self.steps: list[Step] = []
        self.last_layer = -1
        self.read_depths: set[int] = set()  # stack depths of module calls that read a size of the input
        self.contained = True  # every such call returned tensors only and set no attribute
        self.resume = 0  # steps recorded when the last such call returned
        self.operands = Operands(self)  # parameters and buffers applied to the input channel by channel
        self.blanks = Blanks(self.tag, self.mark)  # tensors made blank, which the input may be copied into

    def enter(self, module: nn.Module, args: Any) -> None:
        outside = self.opaque is None
        super().enter(module, args)
        if outside and self.opaque is module:  # a rewritten stem (inflate._rewrites.reader): read as a whole
            self._read_whole(module, args[0] if args else None, rewriting.reader(module))

    def _read_whole(self, module: nn.Module, x: Any, reads: rewriting.Reader) -> None:
        """A rewritten stem that reads each input on its own (not followed inside): its convs read the input."""
        tag = self.tag(x)
        where = self.stack[-1]
        if tag is None:
            return
        if isinstance(tag, Lost):
            self.problems.append(f"layer {where} reads the input only after {tag.why}, which mixes or transforms "
                                 "channels in a way inflate cannot follow")
        elif tag != Channels(1) or x.ndim != 4 or self.channels % reads.channels:
            self.problems.append(f"layer {where} reads inputs of {reads.channels} channels on axis 1 of a "
                                 f"(B, C, H, W) input, expected such an input, got shape {tuple(x.shape)} with "
                                 f"the input's {self.channels} channels at {tag}")
        else:
            for child, inner, per_unit in reads.layers:
                conv = module.get_submodule(child)
                owners = self.owners.get(id(conv.weight), [])
                if len(owners) != 1:
                    self.problems.append(f"layer {where}: expected its conv '{child}' to own its weight, "
                                         f"found it in {[o[0] for o in owners]}")
                    continue
                self._record(InputLayer(owners[0][0], owners[0][1],
                                        KernelLayout("conv", groups=conv.groups, inner=inner),
                                        self.channels // reads.channels * per_unit, reads.channels, per_unit))
            self.last_layer = len(self.steps)

    def _record(self, layer: InputLayer) -> None:
        """Note ``layer`` as reading the input; a problem if it was seen reading it otherwise."""
        if self.found.setdefault(layer.name, layer) != layer:
            self.problems.append(f"layer '{layer.name}' reads the input in two different layouts")

    def start(self, call: Call) -> None:
        self.channels = call.channels
        for x in call.images:
            self.mark(x, Channels(call.channel_axis))

    def finish(self, out: Any) -> None:
        for t in ops.tensors(out):
            tag = self.tag(t)
            if tag is not None:
                how = tag.why if isinstance(tag, Lost) else "channel-wise operations only"
                hint = f"; {_REPORT}" if isinstance(tag, Lost) and tag.unknown else ""
                self.problems.append(f"the model output depends on the input through {how}, not through a "
                                     f"layer inflate can widen{hint}")

    def tag(self, tensor: Any) -> Tag | None:
        entry = self.tags.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def mark(self, tree: Any, tag: Tag) -> None:
        for t in ops.tensors(tree):
            self.tags[id(t)] = (t, tag)

    def before(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
        op = ops.lookup(func)
        kind = op.kind if op is not None else None
        operands = ops.tensors(args)
        if kwargs:
            operands += ops.tensors(kwargs)
        tagged = any(self.tag(t) is not None for t in operands)
        widened = False
        if kind in ops.CONSUMERS:
            widened = self._consume(kind, args, kwargs)
        elif tagged and kind == "escape":
            self.problems.append(f"{ops.name_of(func)}{self.where()} turns input-derived values into Python "
                                 "values (a branch, a number or a list): the inflated model would compute them "
                                 "from other values")
            raise Stop()
        if tagged and (kind == "size" or kind == "split"):  # a size, or a number of pieces: may be C
            if len(self.stack) <= 1:
                self.contained = False  # read by the root module's forward, which runs to the end
            self.read_depths.add(len(self.stack))
        owner = self.operands.list_owner(func, args)
        return op, operands, tagged, widened or owner is not None, owner

    def after(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any], out: Any, seen: Any) -> None:
        op, operands, tagged, widened, owner = seen
        kind = op.kind if op is not None else None
        if tagged and kind not in ("size", "meta", "escape") and kind not in ops.CONSUMERS:
            self._follow(op, func, args, kwargs, out, operands)
        self.operands.see(kind, operands, tagged, out, owner)
        results = ops.tensors(out)
        self.blanks.see(len(self.steps), kind, args, operands, results)
        self.steps.append(Step(func, [] if widened else ops.atoms((args, kwargs)),
                               [(tuple(t.shape), self._tag_or_root(t)) for t in results], kind, widened,
                               self.stack[-1] if self.stack else "<root>"))

    def _tag_or_root(self, t: Tensor) -> Tag | Hashable | None:
        """What the replay needs of an output: its tag, else the id of the parameter or buffer
        it is a view of (its shape changes if that one is widened per input)."""
        tag = self.tag(t)
        if tag is not None:
            return tag
        return self.operands.key_of(t)

    def leave(self, module: nn.Module, args: Any, out: Any) -> None:
        """A module call that read a size of the input has returned: the size stayed inside it
        if it returned tensors only, took no mutable container and set no attribute."""
        depth = len(self.stack)
        if depth in self.read_depths:
            self.read_depths.discard(depth)
            self.contained = self.contained and _only_tensors(out) and _only_tensors(args) \
                and not self.attributes_changed()
            self.resume = len(self.steps)
        super().leave(module, args, out)

    def replay_until(self) -> int | None:
        """Index of the last step the replay must check: the last input layer, or the end of
        the last module call that read a size of the input (None: the whole forward)."""
        if self.read_depths or not self.contained:
            return None
        return max(self.last_layer, self.resume - 1)

    def _follow(self, op: ops.Op | None, func: Callable[..., Any], args: Any, kwargs: dict[str, Any], out: Any,
                operands: list[Tensor]) -> None:
        name = op.name if op is not None else ops.name_of(func)
        if op is not None and op.kind == "setitem":
            mutated: Tensor | None = args[0]
            tag = tags.setitem_tag(args[0], args[1], args[2], self.tag)
        else:
            before = {self.tag(t) for t in operands}
            tag = tags.propagate(op, func, args, kwargs, out, self.tag, self.channels, self.operands.per_channel)
            if isinstance(tag, Lost) and tag not in before:  # lost here: say where
                tag = Lost(tag.why + self.where(), tag.unknown)
            results = ops.tensors(out)
            mutated = next((t for t in operands if any(r is t for r in results)), None)
        if mutated is None:
            if tag is not None:
                self.mark(out, tag)
            return
        was = self.tag(mutated)
        if was is None and isinstance(tag, Channels) and self.blanks.holds(mutated):
            self.mark(mutated, tag)
            self.blanks.fill(mutated, tag, self.where())
            return
        if tag is not None:
            self.mark(mutated, tag)
        if isinstance(tag, Channels) and was == tag:
            return  # a channel-wise write: every view keeps its channel block
        # an in-place write that is not channel-wise: every tagged view of the same memory is lost
        key = storage(mutated)
        lost = Lost(f"in-place {name} on a view of the input{self.where()}")
        for other, _ in list(self.tags.values()):
            if other is not mutated and key is not None and storage(other) == key:
                self.tags[id(other)] = (other, lost)

    def _consume(self, kind: str, args: Any, kwargs: Any) -> bool:
        """Note a weight layer's call; True when it reads the input."""
        layout_kind, spatial = ops.CONSUMERS[kind]
        x = ops.arg(args, kwargs, 0, "input")
        weight = ops.arg(args, kwargs, 1, "weight")
        owners = self.owners.get(id(weight), [])
        standardized = self.computed_by(weight)  # a known weight-standardized conv: widened per input
        if standardized is not None:
            owners = self.owners.get(id(standardized.weight), [])
        tag = self.tag(x)
        if tag is None:
            self.elsewhere.update(o[0] for o in owners)
            return False
        where = self.stack[-1] if self.stack else "<functional call>"
        if isinstance(tag, Lost):
            how = f"; {_REPORT}" if tag.unknown else ", which mixes or transforms channels in a way inflate cannot follow"
            self.problems.append(f"layer {where} reads the input only after {tag.why}{how}")
            return False
        if not owners or "parametrizations" in owners[0][0].split("."):
            self.problems.append(
                f"layer {where} computes its {kind} weight during forward (weight standardization, weight "
                "norm or a parametrization): widening the stored weight would not give an exact model"
            )
            return False
        if len(owners) > 1:
            self.problems.append(f"layer '{owners[0][0]}' shares its weight with " +
                                 ", ".join(f"'{o[0]}'" for o in owners[1:]))
            return False
        groups = ops.arg(args, kwargs, 6, "groups", 1)
        channel_axis = x.ndim - 1 if layout_kind == "linear" else x.ndim - spatial - 1
        if tag.dim != channel_axis:
            self.problems.append(f"layer {where} reads the input with its channels moved to axis {tag.dim} "
                                 f"of shape {tuple(x.shape)}, expected axis {channel_axis}")
            return False
        layout = KernelLayout(layout_kind, groups=int(groups), outer=tag.outer, inner=tag.inner)
        module_name, attr = owners[0]
        self._record(InputLayer(module_name, attr, layout, self.channels))
        self.last_layer = len(self.steps)
        return True


def _only_tensors(tree: Any) -> bool:
    """Tensors, None or tuples of them: nothing that can carry a Python number out, or be written into."""
    if tree is None or isinstance(tree, Tensor):
        return True
    return type(tree) is tuple and all(_only_tensors(t) for t in tree)


def discover(model: nn.Module, example_input: Example | None = None, input_arg: int | str | None = None) -> Discovery:
    """Trace ``model`` once (see :mod:`inflate._tracer`) and report the layers that read its input.

    Raises:
        TraceError: the model cannot be run on the example input, or is lazy.
    """
    model = unwrap(model)
    tracer = trace(model, example_input, _InputTracer, input_arg=input_arg, stack=True)
    found = Discovery(list(tracer.found.values()), list(tracer.problems), tracer.steps, tracer.replay_until(),
                      tracer.call, tracer.operands.widened())
    tracer.blanks.resolve(found.steps)  # blank tensors the input was copied into: C wide in their sizes
    tracer.operands.resolve(found.steps)  # views of widened operands: their shapes are the replay's to find out
    found.problems += tracer.operands.problems()
    for layer in found.layers:
        if layer.name in tracer.elsewhere:
            found.problems.append(f"layer '{layer.name}' reads the input and also other tensors: widening it "
                                  "would break those other uses")
    if not found.layers and not found.problems:
        found.problems.append("no Conv or Linear layer reads the input")
    return found


def find_input_layers(model: nn.Module, example_input: Example | None = None, *,
                      input_arg: int | str | None = None) -> list[str]:
    """Qualified names of the layers that read the model input, in forward order.

    Args:
        model: any module; ``DataParallel``/DDP/``torch.compile`` wrappers are looked through.
        example_input: what the model is called with: a tensor ``(B, C, ...)``, a tuple
            of positional arguments or a dict of keyword arguments. Shapes and dtypes are
            used on the meta device, values only if the model cannot run on meta. By
            default one tensor: ``C`` from the first conv layer and the spatial size
            from a timm ``pretrained_cfg`` (else 224).
        input_arg: which argument is the input, by position or keyword; default the
            first tensor argument.

    Returns:
        Names as in ``model.named_modules()`` of the unwrapped model.

    Raises:
        InexactError: some layer reads the input in a way that cannot be inflated
            exactly (the message lists every such place).
        TraceError: the model cannot run.

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
    with rewriting.rewritten(rewriting.find(unwrap(model))):
        found = discover(model, example_input, input_arg)
    found.raise_problems()
    return [layer.name for layer in found.layers]

