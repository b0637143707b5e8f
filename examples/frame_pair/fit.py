"""The training loop: a fine-tuning policy, pinned batch norm, optional clipping and spike monitoring.

Resume (:mod:`.resume`), more than one process (:mod:`.ddp`) and feature caching
(:mod:`.cache`) are helpers; the loop itself is the few lines of :func:`fit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from inflate import SpikeMonitor, check_optimizer, find_input_layers, finetune, pin_batchnorm

from . import cache, ddp, resume
from .model import coordinate_loss

Batch = tuple[Tensor, Tensor]


@dataclass
class FitConfig:
    """How one model is trained. ``optimizer`` is ``"sgd"`` or ``"adam"``; ``save_every`` in steps."""

    policy: str | list[Any] = "all"
    lr: float = 3e-4
    steps: int = 100
    optimizer: str = "adam"
    momentum: float = 0.0
    clip_value: float | None = None
    spike_factor: float = 3.0
    spike_window: int = 20
    skip_spikes: bool = False
    save_every: int = 25
    cache: bool = True  # cache the frozen prefix when only the last layer trains on fixed batches
    input_lr: float = 1.0  # the learning rate of the layers that read the input, as a multiple of ``lr``


@dataclass
class History:
    """Per-step losses and the spikes the monitor flagged."""

    steps: list[float] = field(default_factory=list)
    spikes: list[dict[str, float]] = field(default_factory=list)
    trainable: str = ""

    def means(self, every: int) -> list[float]:
        """Means of consecutive groups of ``every`` steps (epoch means on a fixed set)."""
        return [sum(self.steps[i : i + every]) / every for i in range(0, len(self.steps) - every + 1, every)]

    def to_json(self) -> dict[str, Any]:
        """As checkpoint metadata, which is strict JSON: non-finite losses (a diverged run) become None."""
        return _map_floats(asdict(self), lambda v: v if math.isfinite(v) else None)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> History:
        """Back from :meth:`to_json`: None (a non-finite loss) becomes NaN."""
        return cls(**_map_floats(data, lambda v: math.nan if v is None else v))


def _map_floats(value: Any, f: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _map_floats(v, f) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_floats(v, f) for v in value]
    return f(value) if value is None or isinstance(value, float) else value


def make_optimizer(cfg: FitConfig, params: list[nn.Parameter],
                   input_params: Sequence[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """SGD or Adam at ``cfg.lr``; with ``cfg.input_lr != 1``, ``input_params`` (those of ``params`` in the
    layers that read the input) form a second group at ``cfg.input_lr * cfg.lr``."""
    groups: list[dict[str, Any]] | list[nn.Parameter] = params
    if cfg.input_lr != 1:
        ids = {id(p) for p in input_params}
        groups = [{"params": [p for p in params if id(p) not in ids]},
                  {"params": [p for p in params if id(p) in ids], "lr": cfg.input_lr * cfg.lr}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr)


def fit(model: nn.Module, batches: Sequence[Batch] | Callable[[int], Batch], cfg: FitConfig, *,
        checkpoint: Path | None = None, metadata: dict[str, Any] | None = None, progress: str = "") -> History:
    """Train ``model`` in place for ``cfg.steps`` steps.

    ``batches`` is a function ``step -> (inputs, targets)`` (this process's share of that
    step's batch) or a fixed list cycled through. With ``checkpoint``, model, optimizer and
    progress are committed together every ``cfg.save_every`` steps, the finished model at the end, and an
    interrupted stage found there continues exactly where it was committed.
    """
    batch = (lambda step: batches[step % len(batches)]) if isinstance(batches, Sequence) else batches
    device = next(model.parameters()).device
    example = batch(0)[0][:1].to(device)
    report = finetune(model, cfg.policy, example_input=example)
    pin_batchnorm(model, "eval", small_batch="ignore")  # never flips between training and evaluation
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = find_input_layers(model, example) if cfg.input_lr != 1 else []
    optimizer = make_optimizer(cfg, params, [p for name in inputs for p in model.get_submodule(name).parameters()])
    check_optimizer(model, optimizer)
    history = History(trainable=str(report))
    if checkpoint is not None and (stored := resume.restore(checkpoint, model, optimizer)) is not None:
        history = History.from_json(stored)
    cached = None
    if cfg.cache and isinstance(batches, Sequence) and ddp.world()[1] == 1 and cache.only_last_layer(report):
        cached = cache.cached_forward(model, [x.to(device) for x, _ in batches])
    trainer = ddp.wrap(model)
    monitor = SpikeMonitor(factor=cfg.spike_factor, window=cfg.spike_window, skip=cfg.skip_spikes)
    for loss in history.steps:  # the monitor's state is a function of the losses seen
        monitor.update(loss)
    bar = tqdm(range(len(history.steps), cfg.steps), desc=progress or "fit", leave=False,
               disable=ddp.world()[0] != 0 or not progress)
    for step in bar:
        x, y = batch(step)
        out = cached(step % len(batches)) if cached is not None else trainer(x.to(device))
        loss = coordinate_loss(out, y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = ddp.mean_over_ranks(loss.item())
        history.steps.append(value)
        if not monitor.update(value):
            if cfg.clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
            optimizer.step()
        history.spikes = [asdict(s) for s in monitor.spikes]
        bar.set_postfix(loss=f"{value:.4f}")
        done = step + 1
        if checkpoint is not None and ddp.world()[0] == 0 and (done % cfg.save_every == 0 or done == cfg.steps):
            meta = {**(metadata or {}), "fit": asdict(cfg)}
            if done == cfg.steps:
                resume.commit_final(checkpoint, model, {**meta, "history": history.to_json()})
            else:
                resume.commit(checkpoint, model, optimizer, meta, history.to_json())
    return history
