"""Forward+backward time of an inflated model vs the same architecture built natively for N*C channels.

Goal: an inflated model trains as fast as a native one, ratio A/B <= 1.02, where

* A = ``timm.create_model(name, in_chans=3)`` then ``inflate_first_conv(A, N)``,
* B = ``timm.create_model(name, in_chans=3 * N)``,

for N = 2 and N = 10. One step is ``model(x).sum().backward()`` on a random batch
(train mode, gradients zeroed before each step). A and B steps alternate
(ABAB...) after a warmup so that thermal/frequency drift hits both alike; A/B
is the median of the ratios of adjacent A and B steps, with a distribution-free
95% confidence interval. Verdict: ``yes`` if A/B <= 1.02, ``no`` if even the
interval's low end is above 1.02, ``noise`` otherwise. A and B must have identical
parameter names and shapes (checked before timing). The ``other CPU`` column
is the share of the CPUs that other processes used during the row: rows above
5% were measured on a contended machine, so they are rerun (``--retries``)
and the least contended attempt is kept.

Run: ``python benchmarks/forward_backward.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from _timing import interleaved, least_contended, median_ci, load_note, table
from inflate import inflate_first_conv

GOAL = 1.02
C = 3
# Small batches and resolutions keep CPU runs short; ViTs are built for that resolution (img_size).
MODELS = ["resnet18", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"]


def step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return step


def check_same_shapes(a: nn.Module, b: nn.Module, label: str) -> None:
    shapes_a = {n: tuple(p.shape) for n, p in a.named_parameters()}
    shapes_b = {n: tuple(p.shape) for n, p in b.named_parameters()}
    if shapes_a != shapes_b:
        diff = {n for n in shapes_a.keys() | shapes_b.keys() if shapes_a.get(n) != shapes_b.get(n)}
        raise SystemExit(f"{label}: inflated and native parameters differ: {sorted(diff)[:5]}")


def measure(name: str, n: int, batch: int, size: int,
            repeats: int) -> tuple[float, float, tuple[float, float, float]]:
    """Median step seconds of A (inflated) and B (native); median of the paired ratios A_i/B_i with its 95% CI."""
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"img_size": size} if name.startswith("vit_") else {}
    x_shape = (batch, C * n, size, size)
    a = timm.create_model(name, in_chans=C, **kwargs)
    inflate_first_conv(a, n, example_input=torch.empty(1, C, size, size))
    b = timm.create_model(name, in_chans=C * n, **kwargs)
    check_same_shapes(a, b, f"{name} N={n}")
    x = torch.randn(x_shape)
    times_a, times_b = interleaved([step_fn(a, x), step_fn(b, x)], repeats, warmup=2)
    ratios = [t_a / t_b for t_a, t_b in zip(times_a, times_b)]  # adjacent in time: drift cancels
    return statistics.median(times_a), statistics.median(times_b), median_ci(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller batch (< 60 s)")
    parser.add_argument("--retries", type=int, default=None,
                        help="reruns of a row disturbed by other processes (default: 0 with --quick, else 2)")
    args = parser.parse_args()
    retries = args.retries if args.retries is not None else (0 if args.quick else 2)
    torch.set_num_threads(2)
    load = load_note()
    batch, size, repeats = (4, 96, 7) if args.quick else (8, 128, 41)

    rows = []
    for name in MODELS:
        for n in (2, 10):
            (t_a, t_b, (low, ratio, high)), other = least_contended(
                lambda: measure(name, n, batch, size, repeats), retries)
            verdict = "yes" if ratio <= GOAL else "no" if low > GOAL else "noise"
            rows.append([name, n, f"{t_a * 1e3:.1f}", f"{t_b * 1e3:.1f}", f"{ratio:.3f}x",
                         f"[{low:.3f}, {high:.3f}]", verdict, f"{other:.0%}"])
            print(f"  done {name} N={n}", file=sys.stderr, flush=True)
    print(f"\nForward+backward, inflated (A) vs native in_chans=3N (B): batch {batch}, {size}x{size}, "
          f"median of {repeats} interleaved steps, {torch.get_num_threads()} threads "
          f"(torch {torch.__version__}, timm {timm.__version__}, {load}; goal: A/B <= {GOAL})\n")
    print(table(["model", "N", "A inflated (ms)", "B native (ms)", "A/B", "95% CI", f"<= {GOAL}", "other CPU"],
                rows))
    print("\nA/B: median of the ratios of adjacent A and B steps, with its 95% confidence interval; "
          f"<= {GOAL}: 'noise' means\nthe median is above the goal but the interval reaches it (not resolved "
          "at this many repeats).")
    print("other CPU: share of the CPUs used by other processes during the row (> ~5%: do not trust it)")


if __name__ == "__main__":
    main()
