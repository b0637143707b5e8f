"""Inflation time vs model construction time, from small models to >= 1B parameters.

Goal: ``inflate_first_conv(model, 2)`` takes <= 5% of the time of building the
model with ``timm.create_model`` (weights randomly initialised, no download).

Per row, each repeat builds a fresh model (timed: construction) and inflates it
(timed: inflation); the table reports the medians and their ratio. Rows on
``cpu`` build real weights; rows on ``meta`` build the model under
``with torch.device("meta")`` (no memory, no weight init), and inflation then
runs on meta too. Repeats stop early once a row has used its time budget
(at least one repeat always runs); the ``n`` column says how many ran. The
``other CPU`` column is the share of the CPUs that other processes used
during the row; a row above 5% is rerun (``--retries``) and the least
contended attempt is kept.

Run: ``python benchmarks/inflation_time.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time

import timm
import torch
from torch import nn

from _timing import least_contended, load_note, table, timed
from inflate import inflate_first_conv

GOAL = 0.05
# (timm model name, device); the >= 1B rows also run on meta, where construction skips weight init.
QUICK = [("resnet18", "cpu"), ("convnext_tiny", "cpu"), ("vit_base_patch16_224", "cpu"),
         ("vit_large_patch16_224", "cpu"), ("vit_giant_patch14_224", "cpu"), ("vit_giant_patch14_224", "meta")]
FULL = QUICK[:4] + [("vit_huge_patch14_224", "cpu"), ("vit_giant_patch14_224", "cpu"),
                    ("vit_gigantic_patch14_clip_224", "cpu"), ("vit_giant_patch14_224", "meta"),
                    ("vit_gigantic_patch14_clip_224", "meta")]


def build(name: str, device: str) -> nn.Module:
    with torch.device(device) if device == "meta" else contextlib.nullcontext():
        return timm.create_model(name)


def measure(name: str, device: str, repeats: int, budget_s: float) -> tuple[int, int, float, float]:
    """(params, repeats run, median construction s, median inflation s)."""
    builds: list[float] = []
    inflations: list[float] = []
    params = 0
    start = time.perf_counter()
    while len(builds) < repeats:
        t_build, model = timed(lambda: build(name, device))
        params = sum(p.numel() for p in model.parameters())
        t_inflate, _ = timed(lambda: inflate_first_conv(model, 2))
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == 6, f"{name}: expected 6 input channels, got {first.in_channels}"
        builds.append(t_build)
        inflations.append(t_inflate)
        del model
        gc.collect()
        elapsed = time.perf_counter() - start
        if elapsed + elapsed / len(builds) > budget_s:  # the next repeat would overrun the budget
            break
    return params, len(builds), statistics.median(builds), statistics.median(inflations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and models (< 60 s)")
    parser.add_argument("--retries", type=int, default=None,
                        help="reruns of a row disturbed by other processes (default: 0 with --quick, else 1)")
    args = parser.parse_args()
    retries = args.retries if args.retries is not None else (0 if args.quick else 1)
    torch.set_num_threads(2)
    load = load_note()
    specs, repeats, budget = (QUICK, 3, 8.0) if args.quick else (FULL, 5, 60.0)

    inflate_first_conv(timm.create_model("resnet18"), 2)  # warmup: first-call costs of torch/timm/inflate
    rows = []
    for name, device in specs:
        (params, n, t_build, t_inflate), other = least_contended(
            lambda: measure(name, device, repeats, budget), retries)
        ratio = t_inflate / t_build
        rows.append([name, device, f"{params / 1e6:,.1f}", n, f"{t_build:.3f}", f"{t_inflate * 1e3:.1f}",
                     f"{100 * ratio:.1f}%", "yes" if ratio <= GOAL else "no", f"{other:.0%}"])
        print(f"  done {name} ({device})", file=sys.stderr, flush=True)
    print(f"\nInflation time vs construction time (torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads, {load}; goal: inflation <= {GOAL:.0%} of construction)\n")
    print(table(["model", "device", "params (M)", "n", "construct (s)", "inflate (ms)", "inflate/construct",
                 "<= 5%", "other CPU"], rows))
    print("\nother CPU: share of the CPUs used by other processes during the row (> ~5%: do not trust it)")


if __name__ == "__main__":
    main()
