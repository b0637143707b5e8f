"""How a model is called: its example arguments, and which of them is the input to inflate.

``example_input`` is a tensor (the only argument), a tuple of positional arguments or a
dict of keyword arguments, as :func:`torch.export.export` takes ``args`` and ``kwargs``.
The input to inflate is the first tensor argument unless ``input_arg`` names it, by
position (an ``int``) or by keyword (a ``str``): a diffusers UNet is called with
``{"sample": x, "timestep": t}`` and ``input_arg="sample"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor

from ._errors import InflateError

__all__ = ["Call", "Example", "as_call"]

#: What ``example_input`` may be.
Example = Union[Tensor, tuple, dict]


@dataclass(frozen=True)
class Call:
    """Positional and keyword arguments of one forward call, and where the input is among them.

    Example:
        >>> call = as_call({"sample": torch.zeros(1, 4, 8, 8), "timestep": torch.tensor(1)}, "sample")
        >>> call.key, tuple(call.input.shape)
        ('sample', (1, 4, 8, 8))
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    key: Union[int, str] = 0

    @property
    def input(self) -> Tensor:
        """The tensor to inflate."""
        return self.args[self.key] if isinstance(self.key, int) else self.kwargs[self.key]

    def with_input(self, x: Tensor) -> Call:
        """The same call with ``x`` in place of the input."""
        if isinstance(self.key, int):
            return Call(self.args[: self.key] + (x,) + self.args[self.key + 1 :], self.kwargs, self.key)
        return Call(self.args, {**self.kwargs, self.key: x}, self.key)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Call:
        """The same call with ``fn`` applied to every tensor argument."""
        args, kwargs = torch.utils._pytree.tree_map_only(Tensor, fn, (self.args, self.kwargs))
        return Call(tuple(args), dict(kwargs), self.key)

    def __call__(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)


def as_call(example_input: Any, input_arg: Any = None) -> Call:
    """Validate ``example_input`` and ``input_arg`` and locate the input.

    Raises:
        InflateError: a wrong type, no tensor to inflate, or ``input_arg`` naming none.
    """
    if isinstance(example_input, Call):
        return example_input
    if input_arg is not None and (isinstance(input_arg, bool) or not isinstance(input_arg, (int, str))):
        raise InflateError(f"input_arg: expected a position (int) or a keyword (str), got {input_arg!r}")
    if isinstance(example_input, Tensor):
        call = Call((example_input,))
    elif type(example_input) is tuple:
        call = Call(example_input)
    elif isinstance(example_input, dict) and all(isinstance(k, str) for k in example_input):
        call = Call((), dict(example_input))
    else:
        raise InflateError("example_input: expected a Tensor, a tuple of positional arguments or a dict of "
                           f"keyword arguments, got {type(example_input).__name__}")
    if input_arg is None:
        keys = [*range(len(call.args)), *call.kwargs]
        key = next((k for k in keys if isinstance(Call(call.args, call.kwargs, k).input, Tensor)), None)
        if key is None:
            raise InflateError("example_input: expected at least one tensor argument to inflate, got none")
        return Call(call.args, call.kwargs, key)
    located = Call(call.args, call.kwargs, input_arg)
    try:
        x = located.input
    except (IndexError, KeyError):
        x = None
    if not isinstance(x, Tensor):
        where = f"position {input_arg}" if isinstance(input_arg, int) else f"keyword {input_arg!r}"
        raise InflateError(f"input_arg: expected the {where} of example_input to hold a tensor, got "
                           f"{type(x).__name__}")
    return located
