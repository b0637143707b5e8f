"""The post-condition: the inflated model, run before it exists, must read its new input
and compute exactly what the original computed.

Before any weight is swapped, the model runs once more with the planned weights
standing in (:class:`inflate._tracer.Plan`) on an ``N*C``-channel input, on the
meta device (or for real, with the real example, where discovery had to run for
real). Each operation is compared with the :class:`~inflate._discovery.Step` that
discovery recorded at the same position:

* the same function;
* the same non-tensor arguments (``x / x.shape[1]`` divides by ``C`` in one and by
  ``N*C`` in the other: refused), except a size given to a reshape, an expand or a
  slice whose output holds the channel block, which may scale from ``C`` to ``N*C``
  (``x[:, :x.shape[1]]``);
* outputs of the expected shapes: a tensor that holds the channel block has it
  ``N*C`` wide, every other tensor the very same shape.

The replay stops early where the channel count cannot reach the rest of the
computation through Python: after the last widened layer if Python never read a size
of an input-derived tensor during discovery; else after the last module call that read
one, if every such call was a submodule's that returned tensors only, received no list
or dict, and set no module attribute (timm's patch embeddings unpack
``B, C, H, W = x.shape``). Otherwise it runs the whole forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import _ops as ops
from ._call import Call
from ._discovery import Discovery, Step
from ._errors import InexactError, TraceError
from ._tags import Channels
from ._tracer import Owners, Plan, Stop, Tracer, trace

__all__ = ["verify"]

_SIZES = ("reshape", "expand", "index", "new")  # kinds whose sizes may follow the channel count


class _Replay(Tracer):
    def __init__(self, owners: Owners, modules: dict[int, str], steps: list[Step], c: int, total: int,
                 stop_at: int | None) -> None:
        super().__init__(owners, modules)
        self.steps, self.c, self.total, self.stop_at = steps, c, total, stop_at
        self.k = 0
        self.problem: str | None = None

    def _refuse(self, what: str) -> BaseException:
        self.problem = what
        return Stop()

    def _scaled(self, size: Any, orig: Any) -> bool:
        return (type(size) is int and type(orig) is int and orig % self.c == 0
                and size == orig // self.c * self.total)

    def _expected(self, shape: tuple[int, ...], tag: Any) -> tuple[int, ...] | None:
        if tag is None:
            return shape
        if isinstance(tag, Channels):
            return shape[: tag.dim] + (shape[tag.dim] // self.c * self.total,) + shape[tag.dim + 1 :]
        return None  # lost: refused by discovery wherever it matters, its shape is not ours to check

    def before(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Step:
        k, self.k = self.k, self.k + 1
        if k >= len(self.steps):
            raise self._refuse(f"the inflated model makes more operations than the original ({ops.name_of(func)}"
                               f"{self.where()}): the input's channel count changes the computation")
        step = self.steps[k]
        if func != step.func:
            raise self._refuse(f"operation {k} is {ops.name_of(step.func)} in {step.where} for the original model "
                               f"and {ops.name_of(func)}{self.where()} for the inflated one: the input's channel count "
                               "changes the computation")
        if not step.widened:
            got = ops.atoms((args, kwargs))
            holds_block = any(isinstance(tag, Channels) for _, tag in step.outs)
            if len(got) != len(step.atoms):
                raise self._refuse(f"{ops.name_of(func)}{self.where()} gets other arguments on the inflated model")
            for new, old in zip(got, step.atoms):
                if _same(new, old):
                    continue
                if step.kind in _SIZES and holds_block and self._scaled(new, old):
                    continue
                raise self._refuse(f"{ops.name_of(func)}{self.where()} gets {old!r} on the original model and "
                                   f"{new!r} on the inflated one: the input's channel count changes the computation")
        return step

    def after(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any], out: Any, step: Step) -> None:
        shapes = [tuple(t.shape) for t in ops.tensors(out)]
        expected = [self._expected(shape, tag) for shape, tag in step.outs]
        if len(shapes) != len(expected) or any(e is not None and s != e for s, e in zip(shapes, expected)):
            raise self._refuse(f"{ops.name_of(func)}{self.where()} gives shapes {shapes} on the inflated model, "
                               f"expected {expected}: the input's channel count changes the computation")
        if self.stop_at is not None and self.k > self.stop_at:
            raise Stop()

    def finish(self, out: Any) -> None:
        if self.k != len(self.steps) and self.problem is None:
            self.problem = (f"the inflated model makes {self.k} operations, the original {len(self.steps)}: the "
                            "input's channel count changes the computation")


def _same(new: Any, old: Any) -> bool:
    """Equal non-tensor arguments (both NaN counts as equal; anything that cannot say, as not)."""
    if new is old:
        return True
    try:
        return bool(new == old) or (type(new) is float and type(old) is float and new != new and old != old)
    except Exception:  # noqa: BLE001 - e.g. an array, whose == gives no single truth value
        return False


def _wide_input(call: Call, counts: Sequence[int]) -> Any:
    """The input with ``sum(counts)`` channels: meta, or built from the real example's channels."""
    axis, c = call.channel_axis, call.channels
    wide = []
    for x in call.images:
        if x.is_meta:
            wide.append(torch.empty(*x.shape[:axis], sum(counts), *x.shape[axis + 1 :], dtype=x.dtype, device="meta"))
        else:
            wide.append(x.index_select(axis, torch.cat([torch.arange(ci) % c for ci in counts]).to(x.device)))
    return wide[0] if isinstance(call.input, Tensor) else wide


def verify(model: nn.Module, found: Discovery, plan: Plan, counts: Sequence[int]) -> None:
    """Run ``model`` with ``plan`` standing in on a ``sum(counts)``-channel input and
    compare every operation with discovery's record.

    Raises:
        InexactError: the inflated model would fail on its new input (naming the module
            and quoting the model's own message), or would compute differently.
    """
    assert found.call is not None
    c, total = found.call.channels, sum(counts)
    stop_at = found.replay_until

    def factory(owners: Owners, modules: dict[int, str]) -> _Replay:
        return _Replay(owners, modules, found.steps, c, total, stop_at)

    call = found.call.with_input(_wide_input(found.call, counts))
    try:
        replay = trace(model, call, factory, stack=True, meta=call.images[0].is_meta, plan=plan)
    except TraceError as error:
        cause = error.__cause__
        message = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
        raise InexactError(f"the inflated model cannot read its new input of shape {call.shape}: "
                           f"{_failed_in(error)}raised {message}") from error
    if replay.problem is not None:
        raise InexactError(f"cannot inflate exactly:\n  - {replay.problem}")


def _failed_in(error: TraceError) -> str:
    stack = getattr(error, "failed_in", None)
    return f"{stack[-1]} " if stack else ""
