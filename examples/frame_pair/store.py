"""Stored models: one ``models/<stage>.safetensors`` per stage, reused when complete, continued with
``--resume`` when interrupted, refused when made with another configuration; rebuilt from their metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inflate import inflate_first_conv, load_checkpoint

from .config import RunConfig
from .model import CoordNet

ARCHITECTURE = "CoordNet(tf_efficientnet_lite0)"
SAME = ("size", "frames", "videos", "batch_size", "seed", "input_lr")  # what a stored stage must share with the run


def metadata(cfg: RunConfig, stage: str, num_inputs: int, init: str | None) -> dict[str, Any]:
    return {"stage": stage, "architecture": ARCHITECTURE, "num_inputs": num_inputs, "init": init,
            "run": cfg.to_json()}


def stored(cfg: RunConfig, path: Path, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A complete stage found at ``path``: ``(state dict, metadata)``; None: train it, or continue it with ``--resume``.

    Exits with a one-line message for a stage stored with another configuration, or an
    interrupted one without ``--resume``.
    """
    if not Path(f"{path}.safetensors").exists():
        return None
    state, meta = load_checkpoint(path)
    run = cfg.to_json()
    differ = [f"{k}: {meta['run'].get(k)} there, {run[k]} now" for k in SAME if meta["run"].get(k) != run[k]]
    if meta.get("fit", {}).get("steps", steps) != steps:
        differ.append(f"steps: {meta['fit']['steps']} there, {steps} now")
    if differ:
        raise SystemExit(f"{path}: stored with another configuration ({'; '.join(differ)}); choose another --out")
    if meta["complete"]:
        return state, meta
    if not cfg.resume:
        done = len(meta["progress"]["steps"])
        raise SystemExit(f"{path}: an interrupted stage ({done} of {steps} steps); "
                         "pass --resume to continue it or choose another --out")
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON in one atomic step (as checkpoints are written)."""
    from inflate._checkpoint import _atomic_write

    _atomic_write(path, json.dumps(data, indent=2, default=str).encode())


def rebuild(meta: dict[str, Any]) -> nn.Module:
    """A model of the architecture a checkpoint's metadata describes (weights not loaded)."""
    model = CoordNet(pretrained=False)
    if meta["num_inputs"] > 1:
        inflate_first_conv(model, meta["num_inputs"], init=meta["init"], example_input=torch.zeros(1, 3, 64, 112))
    return model


def load_model(path: Path, device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a complete stored stage and load its weights."""
    state, meta = load_checkpoint(path)
    if not meta.get("complete"):
        raise ValueError(f"{path}: an interrupted stage, not a stored model (continue it with --resume)")
    model = rebuild(meta)
    model.load_state_dict(state)
    return model.to(device or torch.device("cpu")), meta
