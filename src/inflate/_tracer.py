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

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import _ops as ops
from . import _rewrites as rewriting
from . import _standardized as standardized
from ._call import Call, Example, as_call
from ._errors import InflateError, TraceError
from ._examples import default_example_calls

__all__ = ["Tracer", "Plan", "Stop", "trace", "unwrap", "label"]

#: Each module's ``__dict__`` and a copy of it as the call began.
Snapshots = list[tuple[dict[str, Any], dict[str, Any]]]
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
        self.objects: list[nn.Module] = []  # the modules being called, innermost last
        # id(weight-standardized conv being called) -> the tensors its weight is computed from, by id
        self.computing: dict[int, dict[int, Tensor]] = {}
        self.failed_in: list[str] | None = None  # the stack where the model raised, if it did
        self.snapshots: Snapshots = []  # module __dict__s as the call began, and their copies
        self.call: Call | None = None  # the call as it ran (meta or real arguments)
        self.buffer_owners: Owners = {}  # id(buffer stand-in) -> [(module name, attribute)]
        self.opaque: nn.Module | None = None  # a stem that reads the input as a whole, being called

    def where(self) -> str:
        """`` in 'name' (Class)`` of the module being called, for messages; empty at the root."""
        return f" in {self.stack[-1]}" if self.stack else ""

    def enter(self, module: nn.Module, args: Any) -> None:
        """Called as a module's forward begins (with ``stack=True``)."""
        self.stack.append(label(self.modules.get(id(module), "?"), module))
        self.objects.append(module)
        if self.opaque is None and rewriting.reader(module) is not None:
            self.opaque = module  # its operations are neither followed nor recorded (see inflate._rewrites)
        tensors = standardized.weight_tensors(module)
        if tensors is not None:
            self.computing[id(module)] = tensors

    def leave(self, module: nn.Module, args: Any, out: Any) -> None:
        """Called as a module's forward returns (with ``stack=True``)."""
        self.stack.pop()
        if self.objects.pop() is self.opaque:
            self.opaque = None

    def attributes_changed(self) -> bool:
        """Whether the forward so far set, replaced or deleted any module attribute."""
        return any(len(state) != len(snap) or any(state.get(k, _ABSENT) is not v for k, v in snap.items())
                   for state, snap in self.snapshots)

    def start(self, call: Call) -> None:
        """Called with the (meta or real) call before the forward pass."""

    def computed_by(self, t: Tensor) -> nn.Module | None:
        """The weight-standardized conv being called, if ``t`` is a tensor it computed from
        its own weights alone (see :mod:`inflate._standardized`)."""
        side = self.computing.get(id(self.objects[-1])) if self.objects else None
        return self.objects[-1] if side is not None and side.get(id(t)) is t else None

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.opaque is not None:  # inside a stem that reads the input as a whole: seen from outside only
            return self._call(func, args, kwargs)
        side = self.computing.get(id(self.objects[-1])) if self.computing and self.objects else None
        operands = ops.tensors((args, kwargs)) if side is not None else []
        if operands and all(side.get(id(t)) is t for t in operands):  # type: ignore[union-attr]
            # a known weight-standardized conv computing its weight from its own tensors: neither
            # followed nor recorded, in discovery as in the replay (which sees its widened forward)
            out = self._call(func, args, kwargs)
            side.update((id(t), t) for t in ops.tensors(out))  # type: ignore[union-attr]
            return out
        try:
            seen = self.before(func, args, kwargs)
        except Exception as error:
            raise _bug(func, self, error) from error
        out = self._call(func, args, kwargs)
        try:
            self.after(func, args, kwargs, out, seen)
        except Exception as error:
            raise _bug(func, self, error) from error
        return out

    def _call(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
        try:
            return func(*args, **kwargs)  # the model's own computation: its errors are the model's
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise

    def before(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
        """Called before each operation; what it returns is handed to :meth:`after`."""

    def after(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any], out: Any, seen: Any) -> None:
        """Called after each operation with its output."""

    def finish(self, out: Any) -> None:
        """Called with the model output after the forward pass."""


T = TypeVar("T", bound=Tracer)
_ABSENT = object()


def _bug(func: Callable[..., Any], tracer: Tracer, error: Exception) -> InflateError:
    """inflate's own failure while watching ``func``: never reported as the model's."""
    if isinstance(error, InflateError):
        return error
    where = tracer.where()
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    return InflateError(f"inflate failed while following {name}{where} ({type(error).__name__}: {error}): "
                        "a bug in inflate, please report it")


def label(name: str, module: nn.Module) -> str:
    """``'name' (ClassName)``, the way errors name a module."""
    return f"'{name or '<root>'}' ({type(module).__name__})"


@contextmanager
def _module_stack(tracer: Tracer) -> Iterator[None]:
    def pre(module: nn.Module, args: Any) -> None:
        tracer.enter(module, args)

    def post(module: nn.Module, args: Any, out: Any) -> None:
        if sys.exc_info()[0] is not None:  # called from an except block: the forward raised
            if tracer.failed_in is None:
                tracer.failed_in = list(tracer.stack)
            Tracer.leave(tracer, module, args, out)  # the stack only: the call did not return
            return
        try:
            tracer.leave(module, args, out)
        except Exception as error:
            raise _bug(module.forward, tracer, error) from error

    handles = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post, always_call=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: A module and the parameter and buffer dicts it reads during the trace.
Swap = tuple[nn.Module, dict[str, Any], dict[str, Any]]


def _meta_like(t: Tensor) -> Tensor:
    """A meta tensor with the shape, dtype and strides of ``t``."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta", requires_grad=t.requires_grad)


def _twins(walk: list[tuple[str, nn.Module]], meta: bool,
           replace: dict[int, Tensor]) -> tuple[list[Swap], Owners, Owners]:
    """For every module, parameter and buffer dicts holding stand-ins: meta twins, or
    (real run) the parameters themselves and clones of the buffers. A tensor shared
    by several modules gets one stand-in. ``replace`` maps ``id(parameter or buffer)``
    to the tensor that stands in for it instead (a planned, widened one). Returns the
    swaps and the owners of each parameter stand-in and of each buffer stand-in."""
    twins: dict[int, Tensor] = {}
    owners: Owners = {}
    buffer_owners: Owners = {}
    swaps: dict[int, Swap] = {}
    for mod_name, module in walk:
        for table, found, fresh in ((module._parameters, owners, False), (module._buffers, buffer_owners, True)):
            for attr, t in table.items():
                if t is None:
                    continue
                twin = twins.get(id(t))
                if twin is None:
                    twin = replace.get(id(t), t)
                    twin = twins[id(t)] = _meta_like(twin) if meta else twin.clone() if fresh else twin
                    found[id(twin)] = []
                entry = found[id(twin)]
                if not entry or entry[-1][0] != mod_name:  # a module's own entries are consecutive
                    entry.append((mod_name, attr))
        if id(module) not in swaps:
            swaps[id(module)] = (module,
                                 {a: None if p is None else twins[id(p)] for a, p in module._parameters.items()},
                                 {a: None if b is None else twins[id(b)] for a, b in module._buffers.items()})
    return list(swaps.values()), owners, buffer_owners


@contextmanager
def _swapped(swaps: list[Swap], attrs: dict[int, dict[str, Any]]) -> Iterator[Snapshots]:
    """Every module reads its stand-ins during the call, with the plain attributes in
    ``attrs[id(module)]`` set (a widened layer's ``in_channels`` and ``groups``).
    Afterwards each module's attributes are exactly what they were (the very same
    objects): the parameter, buffer and submodule dicts, and any plain attribute a
    forward set or replaced, such as a cached tensor, and the contents of its hook dicts
    (transformers registers output-capturing hooks on a model's first forward and sets a
    flag that they are there: both are put back). Yields each module's ``__dict__`` with
    a copy of it as the call begins."""
    saved = []
    began = []
    try:
        for module, params, buffers in swaps:
            state = module.__dict__
            hooks = {name: dict(state[name]) for name in _HOOKS if isinstance(state.get(name), dict)}
            saved.append((state, state.copy(), hooks))
            state["_parameters"], state["_buffers"] = params, buffers
            state["_modules"] = dict(state["_modules"])  # a submodule registered in forward is dropped
            state.update(attrs.get(id(module), {}))
            began.append((state, state.copy()))
        yield began
    finally:
        for state, before, hooks in saved:
            state.clear()
            state.update(before)
            for name, contents in hooks.items():
                if state[name] != contents:  # a hook the forward added or removed
                    state[name].clear()
                    state[name].update(contents)


#: A module's hook dicts: added to in place by a forward that registers hooks.
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class Stop(BaseException):
    """Raised by a tracer to end the forward early: everything it needed was seen.
    A BaseException, so that a model's own ``except Exception`` does not swallow it."""


@dataclass
class Plan:
    """Stand-ins for a trace of the model as it would be after inflation."""

    weights: dict[int, Tensor] = field(default_factory=dict)  # id(parameter) -> widened weight
    attrs: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(module) -> attributes


def _run(model: nn.Module, walk: list[tuple[str, nn.Module]], call: Call, meta: bool,
         factory: Callable[[Owners, dict[int, str]], T], stack: bool, plan: Plan) -> T:
    _check_input(call)
    call = call.map(_meta_like if meta else Tensor.detach)
    swaps, owners, buffer_owners = _twins(walk, meta, plan.weights)
    tracer = factory(owners, {id(m): n for n, m in walk})
    tracer.buffer_owners = buffer_owners
    tracer.call = call
    tracer.start(call)
    attrs = {key: {a: _meta_like(v) if meta and isinstance(v, Tensor) else v for a, v in values.items()}
             for key, values in plan.attrs.items()}  # tensor attributes get meta twins too
    with torch.no_grad(), _swapped(swaps, attrs) as tracer.snapshots, \
            _module_stack(tracer) if stack else nullcontext():
        try:
            with tracer:
                out = call(model)
        except Stop:
            return tracer
        except Exception as error:
            error._inflate_failed_in = tracer.failed_in  # type: ignore[attr-defined] - read by trace()
            raise
    tracer.finish(out)
    return tracer


def _check_input(call: Call) -> None:
    if isinstance(call.input, Tensor):
        if call.input.ndim < 2:
            raise InflateError(f"example_input: expected the input of shape (B, C, ...), got {call.shape}")
    elif any(t.ndim < 2 for t in call.images) or len({t.shape[0] for t in call.images}) > 1:
        raise InflateError("example_input: expected a list of images (C, H, W) with the same C, got shapes "
                           f"{call.shape}")


def trace(model: nn.Module, example_input: Example | Call | None, factory: Callable[[Owners, dict[int, str]], T],
          *, input_arg: int | str | None = None, stack: bool = False, meta: bool | None = None,
          plan: Plan | None = None) -> T:
    """Run ``model`` once under the tracer that ``factory(owners, modules)`` builds.

    ``stack=True`` keeps ``tracer.stack``, the labels of the modules being called, up
    to date (global module hooks). ``meta``: True runs on the meta device only, False
    for real only (``example_input`` must be real), None tries meta first and then,
    for a real ``example_input``, a real run. ``plan`` swaps in widened weights and
    attributes for the call. The tracer's own errors (:class:`InflateError`) pass through.

    Raises:
        TraceError: the model cannot run on the example input, or has lazy modules.
    """
    walk = list(model.named_modules(remove_duplicate=False))
    lazy = [n for n, m in walk if isinstance(m, nn.modules.lazy.LazyModuleMixin)
            and m.has_uninitialized_params()]  # type: ignore[operator]
    if lazy:
        raise TraceError(f"lazy module '{lazy[0]}': expected initialized parameters, found uninitialized "
                         "ones; run one forward pass first")
    plan = plan or Plan()
    if example_input is None:
        examples = default_example_calls(model)
    else:
        examples = [as_call(example_input, input_arg)]
    for attempt, example in enumerate(examples, 1):
        shape = example.shape
        if meta is not False:
            try:
                return _run(model, walk, example, True, factory, stack, plan)
            except InflateError:
                raise
            except Exception as meta_error:  # noqa: BLE001 - any failure on meta means: try for real
                if meta or example.images[0].is_meta:
                    if attempt < len(examples):
                        continue
                    given = example_input is not None
                    raise _failure(f"the model could not run on {'example_input' if given else 'an example input'} "
                                   f"of shape {shape} on the meta device", meta_error,
                                   "" if given else "; pass example_input")
        try:
            return _run(model, walk, example, False, factory, stack, plan)
        except InflateError:
            raise
        except Exception as error:
            raise _failure(f"the model could not run on example_input of shape {shape}", error, "")
    raise AssertionError("unreachable")


def _failure(what: str, error: Exception, hint: str) -> TraceError:
    """A :class:`TraceError` that names the module where the model raised (``failed_in``)."""
    stack = getattr(error, "_inflate_failed_in", None)
    where = f" (in {stack[-1]})" if stack else ""
    failure = TraceError(f"{what}{where} ({type(error).__name__}: {error}){hint}")
    failure.failed_in = stack  # type: ignore[attr-defined]
    failure.__cause__ = error
    return failure
