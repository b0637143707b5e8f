"""The one error type of the library."""

from __future__ import annotations

__all__ = ["InflateError"]


class InflateError(ValueError):
    """Raised when a model cannot be inflated exactly, or an argument is invalid.

    The message names the layer involved, what was expected and what was found.
    When it is raised by :func:`inflate.inflate_first_conv` the model is unchanged.

    Example:
        >>> import torch.nn as nn
        >>> from inflate import InflateError, inflate_first_conv
        >>> try:
        ...     inflate_first_conv(nn.Conv2d(3, 8, 3), num_inputs=0)
        ... except InflateError as err:
        ...     print(err)
        num_inputs: expected an int >= 1, got 0
    """
