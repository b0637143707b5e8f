"""More than one process: who this process is, averaging a number over processes, wrapping the model.

Under ``torchrun`` every process trains on its share of each batch
(:func:`~examples.frame_pair.data.training_batch` with ``part=world()``), gradients are
averaged by DistributedDataParallel, and only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start() -> None:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on GPU); share the CPU cores
    among the processes unless ``OMP_NUM_THREADS`` says otherwise."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "OMP_NUM_THREADS" not in os.environ:  # an explicit choice wins
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world()[1]))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value: float) -> float:
    """``value`` averaged over the processes (every process gets the same number)."""
    size = world()[1]
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / size


def wrap(model: nn.Module) -> nn.Module:
    """``model`` under DistributedDataParallel when there is more than one process."""
    return nn.parallel.DistributedDataParallel(model) if world()[1] > 1 else model


def say(*text: object) -> None:
    """Print on rank 0 only."""
    if world()[0] == 0:
        print(*text, flush=True)
