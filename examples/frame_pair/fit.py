"""The training loop: a fine-tuning policy, pinned batch norm, optional clipping, spike monitoring,
cached frozen features, DistributedDataParallel, and resumable per-epoch checkpoints."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from inflate import SpikeMonitor, check_optimizer, finetune, load_checkpoint, pin_batchnorm, save_checkpoint, split_frozen
from inflate._checkpoint import _atomic_write

from .data import Sample
from .model import coordinate_loss


@dataclass
class FitConfig:
    """How one model is trained. ``optimizer`` is ``"sgd"`` (the study's) or ``"adam"``."""

    policy: str | list[Any] = "last"
    lr: float = 0.101
    epochs: int = 5
    batch_size: int = 4
    optimizer: str = "sgd"
    momentum: float = 0.0
    clip_value: float | None = None
    spike_factor: float = 3.0
    skip_spikes: bool = False
    cache: bool = True  # cache the frozen prefix when only the last layer trains


@dataclass
class History:
    """Per-step and per-epoch losses, and the spikes the monitor flagged."""

    steps: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    spikes: list[dict[str, float]] = field(default_factory=list)
    trainable: str = ""

    def to_json(self) -> dict[str, Any]:
        """As checkpoint metadata, which is strict JSON: non-finite losses (a diverged run) become None."""
        return _finite_or_none(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> History:
        """Back from :meth:`to_json`: None (a non-finite loss) becomes NaN."""
        return cls(**_none_to_nan(data))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _none_to_nan(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _none_to_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return value


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batches(samples: list[Sample], batch_size: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """Fixed consecutive batches (no shuffling: the study overfits a fixed set); this rank's share of each."""
    rank, size = world()
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        if len(chunk) % size:
            raise ValueError(f"batch of {len(chunk)} samples cannot be split evenly over {size} processes")
        part = chunk[rank * len(chunk) // size : (rank + 1) * len(chunk) // size]
        out.append((torch.stack([s.inputs for s in part]).to(device), torch.stack([s.target for s in part]).to(device)))
    return out


def _mean_over_ranks(value: float) -> float:
    rank, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / size


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as checkpoints are written (temporary file, fsync, one rename, folder fsync)."""
    _atomic_write(path, data)


def _save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    atomic_write(path, buffer.getvalue())


def fit(model: nn.Module, samples: list[Sample], cfg: FitConfig, *, checkpoint: Path | None = None,
        metadata: dict[str, Any] | None = None, progress: str = "") -> History:
    """Train ``model`` in place; with ``checkpoint``, save after every epoch and resume from the last one."""
    rank, size = world()
    device = next(model.parameters()).device
    data = batches(samples, cfg.batch_size, device)
    example = data[0][0][:1]
    report = finetune(model, cfg.policy, example_input=example)
    pin_batchnorm(model, "eval", small_batch="ignore")
    model.train()
    history, start = History(trainable=str(report)), 0
    if checkpoint is not None and Path(f"{checkpoint}.safetensors").exists():
        state, meta = load_checkpoint(checkpoint)
        model.load_state_dict(state)
        history = History.from_json(meta["history"])
        start = len(history.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum) if cfg.optimizer == "sgd"
        else torch.optim.Adam(params, lr=cfg.lr))
    check_optimizer(model, optimizer)
    optim_path = Path(f"{checkpoint}.optim.pt") if checkpoint is not None else None
    if start and optim_path is not None and optim_path.exists():
        optimizer.load_state_dict(torch.load(optim_path, weights_only=True))
    only_last = cfg.cache and size == 1 and report.rows and sum(r[3] for r in report.rows) == 1 and report.rows[-1][3]
    split = split_frozen(model) if only_last else None
    features = split.precompute(x for x, _ in data) if split is not None else None
    trainer = nn.parallel.DistributedDataParallel(model) if size > 1 else model
    # the level is the mean over one epoch of batches: batches differ in difficulty (later frames move more)
    monitor = SpikeMonitor(factor=cfg.spike_factor, window=max(len(data), 2), skip=cfg.skip_spikes)
    for loss in history.steps:
        monitor.update(loss)
    bar = tqdm(range(start, cfg.epochs), desc=progress or "fit", disable=rank != 0 or not progress, leave=False)
    for epoch in bar:
        total = 0.0
        for i, (x, y) in enumerate(data):
            out = split.tail(*features[i]) if split is not None else trainer(x)
            loss = coordinate_loss(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = _mean_over_ranks(loss.item())
            history.steps.append(value)
            total += value
            if monitor.update(value):
                continue
            if cfg.clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
            optimizer.step()
        history.epochs.append(total / len(data))
        history.spikes = [asdict(s) for s in monitor.spikes]
        bar.set_postfix(loss=f"{history.epochs[-1]:.6f}")
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, model, {**(metadata or {}), "fit": asdict(cfg), "history": history.to_json()})
            if optim_path is not None:
                _save_optimizer(optim_path, optimizer)
    return history
