"""How a model is called: its example arguments, and which of them is the input to inflate.

``example_input`` is a tensor (the only argument), a tuple of positional arguments or a
dict of keyword arguments, as :func:`torch.export.export` takes ``args`` and ``kwargs``.
The input to inflate is the first tensor argument unless ``input_arg`` names it, by
position (an ``int``) or by keyword (a ``str``): a diffusers UNet is called with
``{"sample": x, "timestep": t}`` and ``input_arg="sample"``. The input is one tensor
``(B, C, ...)``, or a list of images ``(C, H, W)`` as torchvision's detection models
take (channels on axis 0 of each).
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
    def input(self) -> Any:
        """The argument to inflate: a tensor, or a list of image tensors."""
        return self.args[self.key] if isinstance(self.key, int) else self.kwargs[self.key]

    @property
    def images(self) -> list[Tensor]:
        """The tensors that carry the channels: the input, or each image of a list input."""
        x = self.input
        return [x] if isinstance(x, Tensor) else list(x)

    @property
    def channel_axis(self) -> int:
        """Axis of the channels in each of :attr:`images`: 1 of ``(B, C, ...)``, 0 of ``(C, H, W)``."""
        return 1 if isinstance(self.input, Tensor) else 0

    @property
    def channels(self) -> int:
        """``C``, the channel count of the input."""
        return int(self.images[0].shape[self.channel_axis])

    @property
    def shape(self) -> Any:
        """The input's shape, or the list of its images' shapes, for messages."""
        x = self.input
        return tuple(x.shape) if isinstance(x, Tensor) else [tuple(t.shape) for t in x]

    def with_input(self, x: Any) -> Call:
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
        key = next((k for k in keys if _is_input(Call(call.args, call.kwargs, k).input)), None)
        if key is None:
            raise InflateError("example_input: expected at least one tensor argument to inflate, got none")
        return Call(call.args, call.kwargs, key)
    located = Call(call.args, call.kwargs, input_arg)
    try:
        x = located.input
    except (IndexError, KeyError):
        x = None
    if not _is_input(x):
        where = f"position {input_arg}" if isinstance(input_arg, int) else f"keyword {input_arg!r}"
        raise InflateError(f"input_arg: expected the {where} of example_input to hold a tensor or a list of "
                           f"image tensors, got {type(x).__name__}")
    return located


def _is_input(x: Any) -> bool:
    """A tensor, or a non-empty list of image tensors ``(C, H, W)`` (torchvision detection)."""
    return isinstance(x, Tensor) or type(x) is list and bool(x) and all(isinstance(t, Tensor) for t in x)
