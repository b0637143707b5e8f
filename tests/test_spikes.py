"""The loss-spike monitor."""

import math

import pytest

from inflate import InflateError, SpikeMonitor


def test_spikes_are_flagged_recorded_and_kept_out_of_the_level():
    monitor = SpikeMonitor(factor=2.0, window=4)
    losses = [1.0, 1.0, 1.0, 1.0, 10.0, 9.0, 1.0, math.nan, 1.0]
    flags = [monitor.update(x) for x in losses]
    assert flags == [False] * len(losses)  # skip=False: never asks to skip
    assert [s.step for s in monitor.spikes] == [4, 5, 7]  # the second spike is not hidden by the first
    assert monitor.level == 1.0 and monitor.losses[:3] == [1.0, 1.0, 1.0]


def test_skip_mode_and_warmup():
    monitor = SpikeMonitor(factor=2.0, window=10, skip=True)
    assert [monitor.update(x) for x in [1.0, 5.0, 1.0, 1.0, 1.0, 1.0, 9.0]] == [False] * 6 + [True]


@pytest.mark.parametrize(("kwargs", "message"), [({"factor": 1.0}, "factor"), ({"window": 0}, "window")])
def test_arguments_are_checked(kwargs, message):
    with pytest.raises(InflateError, match=message):
        SpikeMonitor(**kwargs)
