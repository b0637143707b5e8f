"""How long a preset's training takes on this machine, measured on a few steps of each stage.

Run it first on a new machine (``python -m examples.frame_pair throughput --preset long``) to size
a preset to the time there is: it times the real training step of every stage (making the batch
on the device, then forward, backward and Adam, as :func:`~.fit.fit` runs them) and projects the
preset's training time. Evaluation (the classical baselines run on the CPU) is not included.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from . import pipeline
from .config import RunConfig
from .data import training_batch
from .fit import FitConfig, fit
from .model import CoordNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_step(cfg: RunConfig, num_inputs: int, steps: int = 4, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per training step of a ``num_inputs`` model: (making the batch, the rest of the step)."""
    device = pipeline.device()
    torch.manual_seed(cfg.seed)
    model = CoordNet(pretrained=False).to(device)
    model = pipeline.inflated(model, num_inputs) if num_inputs > 1 else model
    calls: list[tuple[int, float, float]] = []

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        _sync(device)
        start = time.perf_counter()
        batch = training_batch(cfg.seed, step, cfg.batch_size, cfg.frames, num_inputs, cfg.size,
                               cfg.training_photos, device=device)
        _sync(device)
        calls.append((step, start, time.perf_counter()))
        return batch

    fit(model, batches, FitConfig(policy="all", lr=cfg.lr, steps=warmup + steps))
    _sync(device)
    calls.append((warmup + steps, time.perf_counter(), 0.0))  # the end of the last step
    data = [end - start for step, start, end in calls[1:-1] if step >= warmup]
    rest = [nxt[1] - cur[2] for cur, nxt in zip(calls[1:], calls[2:]) if cur[0] >= warmup]
    return statistics.median(data), statistics.median(rest)


def measure(cfg: RunConfig, steps: int = 4) -> list[dict[str, Any]]:
    """One row per stage: inputs, steps in the preset, seconds per step (batch, rest) and projected minutes."""
    rows = []
    for stage, n, count in (("base", 1, cfg.base_steps), ("single", 1, cfg.steps), ("pair", 2, cfg.steps),
                            (f"frames{cfg.many}", cfg.many, cfg.steps)):
        data, rest = stage_step(cfg, n, steps) if stage != "single" else (rows[0]["batch s"], rows[0]["step s"])
        rows.append({"stage": stage, "inputs": n, "steps": count, "batch s": data, "step s": rest,
                     "minutes": count * (data + rest) / 60})
    return rows
