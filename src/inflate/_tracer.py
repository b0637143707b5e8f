"""Run a model once on the meta device while a TorchFunctionMode watches every tensor operation.

Every parameter and buffer is swapped for a meta twin (each module's parameter
and buffer dicts are replaced for the duration of the call, as
:func:`torch.func.functional_call` does attribute by attribute; afterwards every
module's attributes are put back as the very same objects): no memory, no real
compute, and the model is neither copied nor changed. If the forward cannot run on meta (data-dependent
control flow, tensors kept outside parameters and buffers) and a real example
input was given, it runs once for real under ``torch.no_grad()`` with cloned
buffers, so running statistics are not touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import _leaves as leaves, _shapes as shapes
from ._errors import InflateError

__all__ = ["Tracer", "trace", "unwrap", "default_example_inputs"]

#: id(parameter stand-in) -> [(module name, attribute)], one entry per owning module.
Owners = dict[int, list[tuple[str, str]]]


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers.

    Example:
        >>> net = torch.nn.Conv2d(3, 4, 1)
        >>> unwrap(torch.nn.DataParallel(net)) is net
        True
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class Tracer(TorchFunctionMode):
    """Base of the watchers: knows parameter owners, module names and the module call stack."""

    def __init__(self, owners: Owners, modules: dict[int, str]) -> None:
        super().__init__()
        self.owners = owners
        self.modules = modules
        self.stack: list[str] = []  # labels of the modules being called, innermost last

    def start(self, x: Tensor) -> None:
        """Called with the (meta or real) input before the forward pass."""

    def call(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
        """``func(*args, **kwargs)``, through :mod:`inflate._shapes` where it knows a meta output."""
        rule = shapes.RULES.get(func)  # shapes.shortcut, inlined: this runs for every operation
        out = shapes.MISSING if rule is None else rule(args, kwargs)
        if out is shapes.MISSING:
            return func(*args, **kwargs)
        if shapes.CHECK:
            shapes.check(func, args, kwargs, out)
        return out

    def finish(self, out: Any) -> None:
        """Called with the model output after the forward pass."""

    def lowered(self, module: nn.Module) -> Callable[..., Any] | None:
        """A stand-in for ``module.forward`` that hands this tracer the operations the
        stock forward would make (:mod:`inflate._leaves`), without running the forward."""
        lower = leaves.lowering(module)
        if lower is None:
            return None
        stock = type(module).forward.__get__(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            # a plain tensor only: a subclass may have a __torch_function__ of its own, which the
            # calls below (made with torch functions off, as inside this mode's handler) would skip
            if len(args) == 1 and not kwargs and type(args[0]) is Tensor:
                with torch._C.DisableTorchFunction():
                    calls = lower(module, args[0])
                    if calls is not None:
                        for func, call_args, call_kwargs in calls:
                            out = self.__torch_function__(func, (), call_args, call_kwargs)
                        return out
            return stock(*args, **kwargs)

        return forward


T = TypeVar("T", bound=Tracer)


def label(name: str, module: nn.Module) -> str:
    """``'name' (ClassName)``, the way errors name a module."""
    return f"'{name or '<root>'}' ({type(module).__name__})"


@contextmanager
def _module_stack(tracer: Tracer) -> Iterator[None]:
    def pre(module: nn.Module, _: Any) -> None:
        tracer.stack.append(label(tracer.modules.get(id(module), "?"), module))

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


#: A module and the parameter and buffer dicts it reads during the trace.
Swap = tuple[nn.Module, dict[str, Any], dict[str, Any]]


def _twins(walk: list[tuple[str, nn.Module]], meta: bool) -> tuple[list[Swap], Owners]:
    """For every module, parameter and buffer dicts holding stand-ins: meta twins, or
    (real run) the parameters themselves and clones of the buffers. A tensor shared
    by several modules gets one stand-in."""
    twins: dict[int, Tensor] = {}
    owners: Owners = {}
    swaps: dict[int, Swap] = {}
    for mod_name, module in walk:
        for attr, p in module._parameters.items():
            if p is None:
                continue
            twin = twins.get(id(p))
            if twin is None:
                twin = twins[id(p)] = shapes.meta_like(p) if meta else p
                owners[id(twin)] = []
            entry = owners[id(twin)]
            if not entry or entry[-1][0] != mod_name:  # a module's own entries are consecutive
                entry.append((mod_name, attr))
        if id(module) in swaps:
            continue
        for b in module._buffers.values():
            if b is not None and id(b) not in twins:
                twins[id(b)] = shapes.meta_like(b) if meta else b.clone()
        swaps[id(module)] = (module, {a: None if p is None else twins[id(p)] for a, p in module._parameters.items()},
                             {a: None if b is None else twins[id(b)] for a, b in module._buffers.items()})
    return list(swaps.values()), owners


@contextmanager
def _swapped(swaps: list[Swap], lowered: Callable[[nn.Module], Callable[..., Any] | None]) -> Iterator[None]:
    """Every module reads its stand-ins during the call, and a stock layer's forward is
    ``lowered(module)`` where that is not None. Afterwards each module's attributes are
    exactly what they were (the very same objects): the parameter, buffer and submodule
    dicts, and any plain attribute a forward set or replaced, such as a cached tensor."""
    saved = []
    try:
        for module, params, buffers in swaps:
            attrs = module.__dict__
            saved.append((attrs, attrs.copy()))
            attrs["_parameters"], attrs["_buffers"] = params, buffers
            attrs["_modules"] = dict(attrs["_modules"])  # a submodule registered in forward is dropped
            forward = lowered(module)
            if forward is not None:
                attrs["forward"] = forward
        yield
    finally:
        for attrs, before in saved:
            attrs.clear()
            attrs.update(before)


def _run(model: nn.Module, walk: list[tuple[str, nn.Module]], example: Tensor, meta: bool,
         factory: Callable[[Owners, dict[int, str]], T], stack: bool) -> T:
    x = shapes.meta_like(example) if meta else example.detach()
    if x.ndim < 2:
        raise InflateError(f"example_input: expected shape (B, C, ...), got {tuple(example.shape)}")
    swaps, owners = _twins(walk, meta)
    tracer = factory(owners, {id(m): n for n, m in walk})
    tracer.start(x)
    with torch.no_grad(), _swapped(swaps, tracer.lowered), _module_stack(tracer) if stack else nullcontext(), tracer:
        out = model(x)
    tracer.finish(out)
    return tracer


def trace(model: nn.Module, example_input: Tensor | None, factory: Callable[[Owners, dict[int, str]], T],
          *, stack: bool = False) -> T:
    """Run ``model`` once under the tracer that ``factory(owners, modules)`` builds.

    ``stack=True`` keeps ``tracer.stack``, the labels of the modules being called, up
    to date (global module hooks, which slow every module call down: ask for it only
    to name places in error messages).

    Raises:
        InflateError: the model cannot run on the example input, or has lazy modules.
    """
    walk = list(model.named_modules(remove_duplicate=False))
    lazy = [n for n, m in walk if isinstance(m, nn.modules.lazy.LazyModuleMixin)
            and m.has_uninitialized_params()]  # type: ignore[operator]
    if lazy:
        raise InflateError(f"lazy module '{lazy[0]}': expected initialized parameters, found uninitialized "
                           "ones; run one forward pass first")
    examples = default_example_inputs(model) if example_input is None else [example_input]
    for attempt, example in enumerate(examples, 1):
        try:
            return _run(model, walk, example, True, factory, stack)
        except (InflateError, shapes.Mismatch):  # Mismatch: a failed shapes.check, a bug to report
            raise
        except Exception as meta_error:  # noqa: BLE001 - any failure on meta means: try for real
            if not example.is_meta:
                try:
                    return _run(model, walk, example, False, factory, stack)
                except Exception as error:
                    raise InflateError(f"the model could not run on example_input of shape "
                                       f"{tuple(example.shape)} ({type(error).__name__}: {error})") from error
            if attempt == len(examples):
                raise InflateError(f"the model could not run on an example input of shape "
                                   f"{tuple(example.shape)} ({type(meta_error).__name__}: {meta_error}); "
                                   "pass example_input") from meta_error
    raise AssertionError("unreachable")
