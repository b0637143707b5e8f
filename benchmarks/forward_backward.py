"""Forward+backward time of an inflated model vs the same architecture built natively for N*C channels.

Goal: an inflated model trains as fast as a native one, ratio A/B <= 1.02, where

* A = ``timm.create_model(name, in_chans=3)`` then ``inflate_first_conv(A, N)``,
* B = ``timm.create_model(name, in_chans=3 * N)``,

for N = 2 and N = 10. One step is ``model(x).sum().backward()`` on a random batch
(train mode, gradients zeroed before each step). A and B steps alternate
(ABAB...) after a warmup so that thermal/frequency drift hits both alike, and
the medians are compared. A and B must have identical parameter names and
shapes (checked before timing).

Run: ``python benchmarks/forward_backward.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from _timing import interleaved_medians, load_note, table
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


def measure(name: str, n: int, batch: int, size: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one step of A (inflated) and B (native)."""
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"img_size": size} if name.startswith("vit_") else {}
    x_shape = (batch, C * n, size, size)
    a = timm.create_model(name, in_chans=C, **kwargs)
    inflate_first_conv(a, n, example_input=torch.empty(1, C, size, size))
    b = timm.create_model(name, in_chans=C * n, **kwargs)
    check_same_shapes(a, b, f"{name} N={n}")
    x = torch.randn(x_shape)
    t_a, t_b = interleaved_medians([step_fn(a, x), step_fn(b, x)], repeats, warmup=2)
    return t_a, t_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller batch (< 60 s)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    load = load_note()
    batch, size, repeats = (4, 96, 5) if args.quick else (8, 128, 21)

    rows = []
    for name in MODELS:
        for n in (2, 10):
            t_a, t_b = measure(name, n, batch, size, repeats)
            ratio = t_a / t_b
            rows.append([name, n, f"{t_a * 1e3:.1f}", f"{t_b * 1e3:.1f}", f"{ratio:.3f}x",
                         "yes" if ratio <= GOAL else "no"])
            print(f"  done {name} N={n}", file=sys.stderr, flush=True)
    print(f"\nForward+backward, inflated (A) vs native in_chans=3N (B): batch {batch}, {size}x{size}, "
          f"median of {repeats} interleaved steps, {torch.get_num_threads()} threads "
          f"(torch {torch.__version__}, timm {timm.__version__}, {load}; goal: A/B <= {GOAL})\n")
    print(table(["model", "N", "A inflated (ms)", "B native (ms)", "A/B", f"<= {GOAL}"], rows))


if __name__ == "__main__":
    main()
