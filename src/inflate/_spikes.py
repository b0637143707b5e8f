"""Training helpers: loss-spike detection (clipping itself is PyTorch's ``clip_grad_value_``/``clip_grad_norm_``)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ._errors import InflateError

__all__ = ["Spike", "SpikeMonitor"]


@dataclass(frozen=True)
class Spike:
    """A step whose loss exceeded ``factor`` times the recent level."""

    step: int
    loss: float
    level: float


@dataclass
class SpikeMonitor:
    """Flags loss spikes: a loss above ``factor`` times the mean of the last ``window`` normal losses.

    Spikes do not enter the running level, so one spike does not hide the next. Until
    ``window // 2`` normal losses (at least 2) have been seen, steps only build the level. A non-finite loss is
    always a spike. With ``skip=True``, :meth:`update` tells the caller to skip the
    optimizer step for a spike.

    Args:
        factor: how many times the recent level counts as a spike (> 1).
        window: how many recent normal losses make the level.
        skip: whether spikes should skip the update.

    Example:
        >>> monitor = SpikeMonitor(factor=3.0, window=4, skip=True)
        >>> [monitor.update(loss) for loss in [1.0, 0.9, 0.8, 5.0, 0.7]]
        [False, False, False, True, False]
        >>> monitor.spikes
        [Spike(step=3, loss=5.0, level=0.9)]
    """

    factor: float = 3.0
    window: int = 20
    skip: bool = False
    spikes: list[Spike] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.factor > 1:
            raise InflateError(f"factor: expected a number > 1, got {self.factor!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise InflateError(f"window: expected an int >= 1, got {self.window!r}")
        self._recent: deque[float] = deque(maxlen=self.window)

    @property
    def level(self) -> float:
        """Mean of the recent normal losses (NaN before any)."""
        return sum(self._recent) / len(self._recent) if self._recent else math.nan

    def update(self, loss: float) -> bool:
        """Record one step's loss; return True if the step should be skipped (a spike and ``skip``).

        Spikes are recorded in :attr:`spikes` whether or not ``skip`` is set.
        """
        loss = float(loss)
        step = len(self.losses)
        self.losses.append(loss)
        warm = len(self._recent) >= max(2, self.window // 2)
        if not math.isfinite(loss) or (warm and loss > self.factor * self.level):
            self.spikes.append(Spike(step, loss, round(self.level, 12)))
            return self.skip
        self._recent.append(loss)
        return False
