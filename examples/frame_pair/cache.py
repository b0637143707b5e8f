"""Feature caching: when only the last layer trains on a fixed set of batches, run the frozen
prefix once per batch (:func:`inflate.split_frozen`) and train the tail on the stored features."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from inflate import split_frozen


def only_last_layer(report: object) -> bool:
    """Whether a :func:`inflate.finetune` report says that exactly the last layer trains."""
    rows = getattr(report, "rows", [])
    return bool(rows) and sum(r[3] for r in rows) == 1 and bool(rows[-1][3])


def cached_forward(model: nn.Module, inputs: list[Tensor]) -> Callable[[int], Tensor]:
    """``i -> model(inputs[i])``, with the frozen prefix computed once per input, here."""
    split = split_frozen(model)
    features = split.precompute(inputs)
    return lambda i: split.tail(*features[i])
