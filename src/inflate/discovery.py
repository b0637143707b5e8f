"""Which layers read the model input, found by following the data.

The model runs once on the **meta device** (shapes only: no memory, no real
compute) with every parameter and buffer swapped for a meta twin by
:func:`torch.func.functional_call`; the model itself is never copied or
changed. A :class:`~torch.overrides.TorchFunctionMode` tags the input and
follows its channel axis through every operation (:mod:`inflate.dataflow`).
Every convolution or linear layer that receives a tagged tensor reads the input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import dataflow
from .dataflow import Channels, Lost, Tag
from .errors import InflateError
from .weights import KernelLayout

__all__ = ["InputLayer", "Discovery", "discover", "find_input_layers", "unwrap"]


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


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _module_label(name: str, module: nn.Module) -> str:
    return f"'{name or '<root>'}' ({type(module).__name__})"


class _Tracer(TorchFunctionMode):
    def __init__(self, owners: dict[int, list[tuple[str, str]]], modules: dict[int, str], channels: int) -> None:
        super().__init__()
        self.owners = owners  # id(param tensor) -> [(module name, attribute)]
        self.modules = modules  # id(module) -> name
        self.channels = channels
        self.tags: dict[int, tuple[Tensor, Tag]] = {}  # keeps tensors alive so ids stay unique
        self.stack: list[str] = []
        self.found: dict[str, InputLayer] = {}
        self.elsewhere: set[str] = set()  # input layers whose weight also reads other tensors
        self.problems: list[str] = []

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
        out = func(*args, **kwargs)
        if dataflow.is_fresh(func) or not dataflow._tensors(out):
            return out
        if any(self.tag(t) is not None for t in dataflow._tensors((args, kwargs))):
            if name in dataflow.CONSUMERS:
                return out  # a weight layer's output no longer carries input channels
            tag = dataflow.propagate(func, args, kwargs, out, self.tag, self.channels)
            if isinstance(tag, Lost) and not tag.why.endswith(")"):
                tag = Lost(tag.why + self.where())
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


@contextmanager
def _module_stack(tracer: _Tracer) -> Iterator[None]:
    def pre(module: nn.Module, _: Any) -> None:
        name = tracer.modules.get(id(module), "?")
        tracer.stack.append(_module_label(name, module))

    def post(module: nn.Module, _: Any, __: Any) -> None:
        tracer.stack.pop()

    handles = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post, always_call=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def default_example_inputs(model: nn.Module) -> list[Tensor]:
    """Meta tensors of plausible input shapes, tried in order.

    ``C`` comes from the first conv or linear layer, then from a timm
    ``pretrained_cfg``; the spatial size from that ``pretrained_cfg`` (else 224).
    """
    first = next((m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None)
    if first is None:
        raise InflateError("example_input: expected a model with a Conv or Linear layer to guess the input "
                           f"shape from, found none in {type(model).__name__}; pass example_input")
    dtype = first.weight.dtype
    if isinstance(first, nn.Linear):
        return [torch.empty(2, first.in_features, device="meta", dtype=dtype)]
    cfg_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", ()))
    dims = len(first.kernel_size)
    spatial = {1: (256,), 2: cfg_size[1:] if len(cfg_size) == 3 else (224, 224), 3: (16, 112, 112)}[dims]
    counts = dict.fromkeys([first.in_channels] + ([cfg_size[0]] if len(cfg_size) == 3 else []))
    return [torch.empty(2, c, *spatial, device="meta", dtype=dtype) for c in counts]


def _twins(model: nn.Module, device: str | None) -> tuple[dict[str, Tensor], dict[int, list[tuple[str, str]]]]:
    """Stand-ins for every parameter and buffer (meta twins, or clones of the buffers)."""
    twins: dict[int, Tensor] = {}
    state: dict[str, Tensor] = {}
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            if id(p) not in twins:
                twins[id(p)] = torch.empty_like(p, device="meta") if device == "meta" else p
                owners[id(twins[id(p)])] = []
            full = f"{mod_name}.{attr}" if mod_name else attr
            state[full] = twins[id(p)]
            if (mod_name, attr) not in owners[id(twins[id(p)])] and not any(
                o[0] == mod_name for o in owners[id(twins[id(p)])]
            ):
                owners[id(twins[id(p)])].append((mod_name, attr))
        for attr, b in module.named_buffers(recurse=False):
            if b is not None and id(b) not in twins:
                twins[id(b)] = torch.empty_like(b, device="meta") if device == "meta" else b.clone()
            if b is not None:
                state[f"{mod_name}.{attr}" if mod_name else attr] = twins[id(b)]
    return state, owners


def _run(model: nn.Module, example: Tensor, device: str | None) -> _Tracer:
    state, owners = _twins(model, device)
    modules = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    x = torch.empty_like(example, device="meta") if device == "meta" else example.detach()
    if x.ndim < 2:
        raise InflateError(f"example_input: expected shape (B, C, ...), got {tuple(example.shape)}")
    tracer = _Tracer(owners, modules, channels=int(x.shape[1]))
    tracer.mark(x, Channels(1))
    with torch.no_grad(), _module_stack(tracer), tracer:
        out = torch.func.functional_call(model, state, (x,), tie_weights=False, strict=False)
    for t in dataflow._tensors(out):
        tag = tracer.tag(t)
        if tag is not None:
            how = tag.why if isinstance(tag, Lost) else "channel-wise operations only"
            tracer.problems.append(f"the model output depends on the input through {how}, not through a layer "
                                   "inflate can widen")
    return tracer


def discover(model: nn.Module, example_input: Tensor | None = None) -> Discovery:
    """Trace ``model`` once and report the layers that read its input.

    Runs on the meta device; if the forward cannot run there (data-dependent
    control flow, tensors kept outside parameters and buffers), it runs once for
    real under ``torch.no_grad()`` on ``example_input`` with cloned buffers, so
    running statistics are not touched.

    Raises:
        InflateError: the model cannot be run on the example input, or is lazy.
    """
    model = unwrap(model)
    lazy = [n for n, m in model.named_modules() if isinstance(m, nn.modules.lazy.LazyModuleMixin)
            and m.has_uninitialized_params()]  # type: ignore[operator]
    if lazy:
        raise InflateError(f"lazy module '{lazy[0]}': expected initialized parameters, found uninitialized "
                           "ones; run one forward pass before inflating")
    examples = default_example_inputs(model) if example_input is None else [example_input]
    for attempt, example in enumerate(examples, 1):
        try:
            tracer = _run(model, example, "meta")
            break
        except InflateError:
            raise
        except Exception as meta_error:  # noqa: BLE001 - any failure on meta means: try for real
            if not example.is_meta:
                try:
                    tracer = _run(model, example, None)
                    break
                except Exception as error:
                    raise InflateError(f"the model could not run on example_input of shape "
                                       f"{tuple(example.shape)} ({type(error).__name__}: {error})") from error
            if attempt == len(examples):
                raise InflateError(f"the model could not run on an example input of shape "
                                   f"{tuple(example.shape)} ({type(meta_error).__name__}: {meta_error}); "
                                   "pass example_input") from meta_error
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
