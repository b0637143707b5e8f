"""The study's stages: single-frame training, inflation to 2 and ~10 frames, the equivalence
reproduction, the fine-tuning sweep, and stored models."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inflate import inflate_first_conv, load_checkpoint

from .data import VIDEOS, Sample, make_video, samples
from .fit import FitConfig, History, atomic_write, fit, world
from .model import CoordNet

STUDY_SIZE = (120, 240)
FULL_SIZE = (360, 640)


@dataclass
class RunConfig:
    """One run of the example; ``--smoke`` shrinks everything to run in seconds."""

    out: Path
    smoke: bool = False
    size: tuple[int, int] = FULL_SIZE
    videos: int = 4
    frames: int = 10
    many: int = 10  # the "about ten" frames of the scale-up stage
    epochs: int = 5
    batch_size: int = 4
    seed: int = 0
    resume: bool = False  # continue interrupted stages

    @classmethod
    def make(cls, out: str, smoke: bool, study_resolution: bool, **overrides: Any) -> RunConfig:
        cfg = cls(Path(out), smoke=smoke, size=STUDY_SIZE if study_resolution else FULL_SIZE)
        if smoke:
            cfg.size, cfg.videos, cfg.frames, cfg.many, cfg.epochs, cfg.batch_size = (
                (64, 112) if not study_resolution else (40, 80), 2, 4, 3, 2, 2)
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        return cfg


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def dataset(cfg: RunConfig, num_inputs: int, videos: tuple[str, ...] | None = None) -> list[Sample]:
    names = videos if videos is not None else VIDEOS[: cfg.videos]
    return samples([make_video(n, cfg.frames, cfg.seed + i) for i, n in enumerate(names)], num_inputs, cfg.size)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic JSON write (rank 0 only)."""
    if world()[0] == 0:
        atomic_write(path, json.dumps(data, indent=2, default=str).encode())


def rebuild(meta: dict[str, Any]) -> nn.Module:
    """A model of the architecture a checkpoint's metadata describes (weights not loaded)."""
    model = CoordNet(pretrained=False)
    if meta["num_inputs"] > 1:
        inflate_first_conv(model, meta["num_inputs"], init=meta["init"],
                           example_input=torch.zeros(1, 3, 64, 112))
    return model


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    state, meta = load_checkpoint(path)
    model = rebuild(meta)
    model.load_state_dict(state)
    return model.to(device()), meta


def stage(cfg: RunConfig, name: str, model: nn.Module, num_inputs: int, init: str | None, fit_cfg: FitConfig,
          data: list[Sample]) -> tuple[nn.Module, History]:
    """Train one stage; a complete stored stage is reused, an interrupted one continues with --resume.

    A stage stored with another data configuration (size, videos, frames, seed, batch size)
    is refused rather than mixed in.
    """
    path = cfg.out / "models" / name
    meta = {"stage": name, "architecture": "CoordNet(tf_efficientnet_lite0)", "num_inputs": num_inputs,
            "init": init, "run": {k: str(v) for k, v in asdict(cfg).items()}}
    if Path(f"{path}.safetensors").exists():
        state, stored = load_checkpoint(path)
        keys = ("size", "videos", "frames", "seed", "batch_size")
        differ = [f"{k}: {stored['run'].get(k)} there, {meta['run'][k]} now" for k in keys
                  if stored["run"].get(k) != meta["run"][k]]
        if differ:
            raise SystemExit(f"{path}: stored with another configuration ({'; '.join(differ)}); choose another --out")
        done = len(stored["history"]["epochs"])
        if done >= fit_cfg.epochs:
            model.load_state_dict(state)
            return model.to(device()), History.from_json(stored["history"])
        if not cfg.resume:
            raise SystemExit(f"{path}: an interrupted stage ({done} of {fit_cfg.epochs} epochs); "
                             "pass --resume to continue it or choose another --out")
    history = fit(model.to(device()), data, fit_cfg, checkpoint=path, metadata=meta, progress=name)
    return model, history


def single_stage(cfg: RunConfig) -> tuple[nn.Module, History]:
    """Stage 1: the pretrained encoder + decoder trained on single frames (all layers, Adam)."""
    fit_cfg = FitConfig(policy="all", lr=3e-4, optimizer="adam", epochs=cfg.epochs, batch_size=cfg.batch_size,
                        cache=False)
    torch.manual_seed(cfg.seed)
    return stage(cfg, "single", CoordNet(), 1, None, fit_cfg, dataset(cfg, 1))


def inflated(single: nn.Module, num_inputs: int, init: str, **kwargs: Any) -> nn.Module:
    example = torch.zeros(1, 3, 64, 112, device=next(single.parameters()).device)
    return inflate_first_conv(copy.deepcopy(single), num_inputs, init=init, example_input=example, **kwargs)


def multi_stage(cfg: RunConfig, single: nn.Module, name: str, num_inputs: int) -> tuple[nn.Module, History]:
    """Inflate the single-frame model (zero rule: it starts exactly as the single-frame model),
    then fine-tune all layers with the study's best setting, SGD lr 0.101, clipping gradient
    values at 0.1."""
    fit_cfg = FitConfig(policy="all", lr=0.101, epochs=cfg.epochs, batch_size=cfg.batch_size, clip_value=0.1)
    return stage(cfg, name, inflated(single, num_inputs, "zero"), num_inputs, "zero", fit_cfg,
                 dataset(cfg, num_inputs))


def equivalence(cfg: RunConfig, single: nn.Module, epochs: int | None = None) -> dict[str, Any]:
    """The study's check: single-input vs two-input with zeroed second-half weights, last layer only,
    SGD lr 0.101, trained identically; and a control inflated with the plain repeat (no zeroing)."""
    epochs = epochs or max(cfg.epochs, 3)
    fit_cfg = FitConfig(policy="last", lr=0.101, epochs=epochs, batch_size=cfg.batch_size)
    one = copy.deepcopy(single)
    two = inflated(single, 2, "zero")
    control = inflated(single, 2, "repeat", scale=False)  # the study's weight.repeat(1, 2, 1, 1)
    data1, data2 = dataset(cfg, 1), dataset(cfg, 2)
    h1 = fit(one, data1, fit_cfg, progress="single-input")
    h2 = fit(two, data2, fit_cfg, progress="two-input (zeroed)")
    hc = fit(control, data2, fit_cfg, progress="two-input (repeat)")
    with torch.no_grad():
        one.eval(), two.eval()
        pred_diff = max((one(s1.inputs[None].to(device())) - two(s2.inputs[None].to(device()))).abs().max().item()
                        for s1, s2 in zip(data1, data2))
    return {"single": h1.epochs[-1], "zeroed": h2.epochs[-1], "repeat_control": hc.epochs[-1],
            "diff": abs(h1.epochs[-1] - h2.epochs[-1]), "control_diff": abs(h1.epochs[-1] - hc.epochs[-1]),
            "max_prediction_diff": pred_diff, "epochs": epochs,
            "curves": {"single": h1.epochs, "zeroed": h2.epochs, "repeat_control": hc.epochs}}


POLICIES = ("last", "first+last", "first+second+last", "all")


def sweep(cfg: RunConfig, single: nn.Module, clip_value: float = 0.01) -> list[dict[str, Any]]:
    """Policies x lr {0.101, 0.05} x {no clipping, value clipping}: final losses and curves."""
    data = dataset(cfg, 2, VIDEOS[: max(1, cfg.videos // 2)])
    results = []
    for policy in POLICIES:
        for lr in (0.101, 0.05):
            for clip in (None, clip_value):
                fit_cfg = FitConfig(policy=policy, lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                    clip_value=clip)
                label = f"{policy} lr={lr} clip={clip}"
                history = fit(inflated(single, 2, "zero"), data, fit_cfg, progress=label)
                results.append({"policy": policy, "lr": lr, "clip": clip, "final": history.epochs[-1],
                                "steps": history.steps, "spikes": history.spikes})
    return results
