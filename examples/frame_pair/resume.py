"""Exact resume: a stage's model, optimizer, random state and progress, committed as one file.

While a stage trains, ``<stage>.safetensors`` holds the model's tensors (``model.*``), the
optimizer's tensors (``optimizer.<param index>.<name>``, e.g. Adam's moments and step),
the random state (``rng``) and, in the header, the optimizer's other state and hyper-
parameters and the caller's progress (the loss history). :func:`inflate.save_checkpoint`
writes it to a temporary file and renames it into place, so a kill at any moment leaves
either the previous commit or the new one: never new weights with an old optimizer.
When the stage completes, :func:`commit_final` replaces it by the plain model checkpoint
that :func:`~examples.frame_pair.store.load_model` rebuilds (no optimizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from inflate import load_checkpoint, save_checkpoint


class _Tensors(nn.Module):
    """A module whose state dict is a given dict of tensors (what save_checkpoint stores)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return self.tensors


def commit(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, metadata: dict[str, Any],
           progress: dict[str, Any]) -> None:
    """Write model, optimizer, random state and ``progress`` to ``<path>.safetensors`` in one atomic step."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    other: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                other.setdefault(str(index), {})[name] = value
    tensors["rng"] = torch.get_rng_state()
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    save_checkpoint(path, _Tensors(tensors), {**metadata, "complete": False, "progress": progress,
                                              "optimizer": {"param_groups": groups, "state": other}})


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Load a commit of :func:`commit` into ``model`` and ``optimizer``; its progress, or None without a file."""
    if not Path(f"{path}.safetensors").exists():
        return None
    tensors, meta = load_checkpoint(path)
    if meta.get("complete", True):
        raise ValueError(f"{path}.safetensors: expected an interrupted stage, got a complete one")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["optimizer"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng"])
    return meta["progress"]


def commit_final(path: Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Replace the stage's file by the plain model checkpoint, marked complete (atomic, like :func:`commit`)."""
    save_checkpoint(path, model, {**metadata, "complete": True})
