"""The errors of the library: one base, :class:`InflateError`, and two kinds of refusal."""

from __future__ import annotations

__all__ = ["InflateError", "TraceError", "InexactError"]


class InflateError(ValueError):
    """Raised when a model cannot be inflated exactly, or an argument is invalid.

    The message names the layer involved, what was expected and what was found.
    When it is raised by :func:`inflate.inflate_first_conv` the model is unchanged.
    Two subclasses tell the refusals apart: :class:`TraceError` (the model could not be
    run to follow its input) and :class:`InexactError` (it ran, and inflating it would not
    be exact, or the inflated model would not run).

    Example:
        >>> import torch.nn as nn
        >>> from inflate import InflateError, inflate_first_conv
        >>> try:
        ...     inflate_first_conv(nn.Conv2d(3, 8, 3), num_inputs=0)
        ... except InflateError as err:
        ...     print(err)
        num_inputs: expected an int >= 1, got 0
    """


class TraceError(InflateError):
    """The model could not be run to follow its input (on the meta device, or on the
    real ``example_input``); the message carries the model's own error.

    ``inflate_first_conv(..., input_layers=[...])`` falls back to the named layers on
    this error only.

    Example:
        >>> import torch, torch.nn as nn
        >>> from inflate import TraceError, find_input_layers
        >>> try:
        ...     find_input_layers(nn.Conv2d(3, 8, 3), torch.zeros(1, 5, 8, 8))
        ... except TraceError as err:
        ...     print(str(err)[:53])
        the model could not run on example_input of shape (1,
    """


class InexactError(InflateError):
    """The model runs, but inflating it would not give an exact model (or a model that
    reads its new input): the message lists every reason, naming the operation and module.

    Example:
        >>> import torch, torch.nn as nn
        >>> from inflate import InexactError, find_input_layers
        >>> net = nn.Sequential(nn.GroupNorm(1, 3), nn.Conv2d(3, 8, 1))
        >>> try:
        ...     find_input_layers(net)
        ... except InexactError as err:
        ...     print(str(err).splitlines()[1][:60])
          - layer '1' (Conv2d) reads the input only after group_norm
    """
