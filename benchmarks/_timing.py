"""Small helpers shared by the benchmarks: perf_counter timing, interleaved repeats, aligned tables,
and a check of how much CPU other processes took meanwhile (reruns when they took too much)."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Run ``fn`` once; return (seconds, result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1) -> list[list[float]]:
    """Seconds of ``repeats`` runs of each ``fn``, run in turn (ABAB...) so that drift hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            samples[i].append(timed(fn)[0])
    return samples


def median_ci(samples: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """(low, median, high): the median with a distribution-free ~95% confidence interval (order statistics)."""
    ordered = sorted(samples)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half) - 1)
    high = min(n - 1, math.ceil(n / 2 + half))
    return ordered[low], statistics.median(ordered), ordered[high]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with aligned columns (text left, numbers right)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(row, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x%").replace(",", ""))
    except ValueError:
        return False
    return True


def _cpu_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (Linux)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:8]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / hz, sum(fields) / hz


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes inside a ``with`` block.

    Timings taken while this is above a few percent are not trustworthy.
    """

    def __enter__(self) -> OtherLoad:
        self._busy, self._total = _cpu_ticks()
        self._own = sum(os.times()[:2])
        self.fraction = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        busy, total = _cpu_ticks()
        own = sum(os.times()[:2]) - self._own
        self.fraction = max(0.0, (busy - self._busy - own) / max(total - self._total, 1e-9))


def load_note() -> str:
    """How busy other processes kept the CPUs for a second before the run (warns on stderr)."""
    with OtherLoad() as load:
        time.sleep(1.0)
    if load.fraction > 0.1:
        print(f"warning: other processes use {load.fraction:.0%} of the CPUs; timings will be distorted",
              file=sys.stderr)
    return f"other processes {load.fraction:.0%} CPU before start"


def wait_quiet(limit: float, max_s: float = 120.0, window_s: float = 5.0) -> None:
    """Sleep until other processes use at most ``limit`` of the CPUs over ``window_s`` (at most ``max_s``)."""
    deadline = time.perf_counter() + max_s
    while time.perf_counter() < deadline:
        with OtherLoad() as other:
            time.sleep(window_s)
        if other.fraction <= limit:
            return


def least_contended(fn: Callable[[], T], retries: int, limit: float = 0.05) -> tuple[T, float]:
    """Run ``fn``; while other processes used more than ``limit`` of the CPUs, rerun it (up to
    ``retries`` times). Returns the result of the least contended run and that run's share."""
    best: tuple[T, float] | None = None
    for attempt in range(retries + 1):
        with OtherLoad() as other:
            result = fn()
        if best is None or other.fraction < best[1]:
            best = (result, other.fraction)
        if other.fraction <= limit or attempt == retries:
            break
        print(f"  other processes used {other.fraction:.0%} of the CPUs: rerunning", file=sys.stderr)
        wait_quiet(limit)
    assert best is not None
    return best
