"""Epoch time of last-layer fine-tuning with and without cached frozen features.

Last-layer fine-tuning recomputes the frozen network every epoch for nothing.
``inflate.split_frozen`` computes the frozen prefix once (the first epoch pays for
it) and later epochs run only the trainable tail. Goal: later epochs >= 20x faster.

For each model, one epoch = every batch once, forward + backward + SGD step, with
the model already inflated to two inputs and fine-tuned on its last layer only.
Uncached and cached epochs are interleaved (ABAB...) and the median is reported.

Run: ``python benchmarks/cached_features.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import statistics  # noqa: E402

from benchmarks._timing import interleaved, load_note, table, timed  # noqa: E402
from inflate import finetune, inflate_first_conv, pin_batchnorm, split_frozen  # noqa: E402


def _models(quick: bool):
    import timm

    from examples.frame_pair.model import CoordNet

    size = 160 if quick else 224
    yield "resnet50 head (timm)", timm.create_model("resnet50", num_classes=10), (3, size, size)
    hw = (120, 240) if quick else (360, 640)
    yield f"CoordNet last conv ({hw[0]}x{hw[1]})", CoordNet(pretrained=False), (3, *hw)


def _case(name, model, shape, batches, batch_size):
    torch.manual_seed(0)
    model = inflate_first_conv(model, 2, init="zero", example_input=torch.zeros(1, *shape))
    c, *spatial = shape
    xs = [torch.rand(batch_size, 2 * c, *spatial) for _ in range(batches)]
    with torch.no_grad():
        ys = [model.eval()(x).detach() + 0.01 for x in xs]
    finetune(model, "last", example_input=xs[0][:1])
    pin_batchnorm(model, "eval")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.101)
    split = split_frozen(model)
    def step(out, y):
        loss = F.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def uncached():
        for x, y in zip(xs, ys):
            step(model(x), y)

    cache = {}

    def first_cached():
        cache["f"] = split.precompute(xs)
        cached()

    def cached():
        for f, y in zip(cache["f"], ys):
            step(split.tail(*f), y)

    first, _ = timed(first_cached)
    t_uncached, t_cached = (statistics.median(t) for t in interleaved([uncached, cached], repeats=3))
    return [name, f"{batches}x{batch_size}", f"{t_uncached:.3f}", f"{first:.3f}", f"{t_cached:.4f}",
            f"{t_uncached / t_cached:.1f}x", "yes" if t_uncached / t_cached >= 20 else "no"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer batches")
    args = parser.parse_args()
    torch.set_num_threads(2)
    note = load_note()
    batches, batch_size = (3, 4) if args.quick else (6, 8)
    rows = [_case(*m, batches, batch_size) for m in _models(args.quick)]
    print(table(["model", "batches", "uncached epoch s", "1st cached epoch s", "cached epoch s",
                 "speed-up", ">= 20x"], rows))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {note}")


if __name__ == "__main__":
    main()
