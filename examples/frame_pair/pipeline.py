"""The main path: a pretrained single-frame model, inflated to 2 and to N frames, trained, evaluated, stored.

1. Build the single-frame coordinate network on ImageNet weights and train it on single frames.
2. Inflate copies of it to 2 and to ``cfg.many`` inputs with the ``zero`` rule: each starts out
   computing exactly what the single-frame model computes.
3. Choose what trains: all layers, Adam, for the compared models alike, each starting from the
   same fresh head (:meth:`~.model.CoordNet.new_head`: the single-frame model's is about zero,
   a saddle); the single-frame model continues with the very same recipe and samples, so the
   comparison isolates the extra frames.
4. Train on samples drawn afresh for every step from the training photos.
5. Evaluate on held-out photos, on training photos and on the Middlebury stereo pair, next to
   classical baselines.
6. Store: every stage is one ``models/<stage>.safetensors`` that rebuilds (:mod:`.store`).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from inflate import inflate_first_conv

from . import ddp, evaluate, store
from .config import RunConfig
from .data import eval_targets, make_video, stereo_pair, training_batch
from .fit import FitConfig, History, fit
from .model import CoordNet


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def train_stage(cfg: RunConfig, name: str, model: nn.Module, num_inputs: int, init: str | None, steps: int,
                stream: int, input_lr: float = 1.0) -> tuple[nn.Module, History]:
    """Train (or reuse, or continue) one stage on the sample stream ``stream``: all layers, Adam ``cfg.lr``
    (the input layer at ``input_lr`` times that)."""
    path = cfg.out / "models" / name
    model = model.to(device())
    if (found := store.stored(cfg, path, steps)) is not None:
        model.load_state_dict(found[0])
        return model, History.from_json(found[1]["history"])
    fit_cfg = FitConfig(policy="all", optimizer="adam", lr=cfg.lr, steps=steps, save_every=cfg.save_every,
                        input_lr=input_lr)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return training_batch(cfg.seed * 100 + stream, step, cfg.batch_size, cfg.frames, num_inputs, cfg.size,
                              cfg.training_photos, part=ddp.world(), device=device())

    history = fit(model, batches, fit_cfg, checkpoint=path, metadata=store.metadata(cfg, name, num_inputs, init),
                  progress=name)
    return model, history


def inflated(single: nn.Module, num_inputs: int, init: str = "zero", **kwargs: Any) -> nn.Module:
    """A copy of ``single`` whose stem reads ``num_inputs`` frames (``init="zero"``: same outputs as ``single``)."""
    example = torch.zeros(1, 3, 64, 112, device=next(single.parameters()).device)
    return inflate_first_conv(copy.deepcopy(single), num_inputs, init=init, example_input=example, **kwargs)


def single_frame_model(cfg: RunConfig) -> tuple[nn.Module, History]:
    """Step 1: the coordinate network on ImageNet weights, trained on single frames (stage ``base``)."""
    torch.manual_seed(cfg.seed)
    return train_stage(cfg, "base", CoordNet(), 1, None, cfg.base_steps, stream=0)


def train_models(cfg: RunConfig) -> dict[str, tuple[nn.Module, int, History]]:
    """Steps 1-4: the single-frame model, then single (continued), pair and frames<many>, trained alike."""
    base, h0 = single_frame_model(cfg)
    models = {"base": (base, 1, h0)}
    for name, n in (("single", 1), ("pair", 2), (f"frames{cfg.many}", cfg.many)):
        start = copy.deepcopy(base) if n == 1 else inflated(base, n)
        start.new_head(cfg.seed)  # the same fresh head for every compared model
        model, history = train_stage(cfg, name, start, n, None if n == 1 else "zero", cfg.steps, stream=1,
                                     input_lr=cfg.input_lr)
        models[name] = (model, n, history)
    return models


def evaluation(cfg: RunConfig, models: dict[str, tuple[nn.Module, int]]) -> dict[str, Any]:
    """Step 5: every model and baseline on held-out photos, training photos and the Middlebury pair."""
    methods = evaluate.methods(models, cfg.size, cfg.flow_size)
    targets = eval_targets(cfg.frames, cfg.eval_targets)
    heldout = [make_video(n, cfg.frames, 10_000 + i) for i, n in enumerate(cfg.heldout_videos)]
    seen = [make_video(n, cfg.frames, 20_000 + i) for i, n in enumerate(cfg.train_videos)]
    pair = stereo_pair()
    evaluate.precompute(methods, [(v.frames[t], v.image) for v in heldout + seen for t in targets] +
                        [(pair.frame, pair.image)])
    evaluate.figures(cfg.out, heldout[0], targets[-1], pair, methods)
    return {"heldout_videos": list(cfg.heldout_videos), "train_videos": list(cfg.train_videos),
            "training_photos": list(cfg.training_photos), "targets": targets,
            "heldout": evaluate.score_videos(heldout, targets, methods),
            "train": evaluate.score_videos(seen, targets, methods),
            "stereo": evaluate.score_stereo(pair, methods)}


def run(cfg: RunConfig) -> dict[str, Any]:
    """The whole example: train, evaluate, store; returns what ``metrics.json`` holds (rank 0)."""
    started = time.time()
    trained = train_models(cfg)
    metrics: dict[str, Any] = {"config": cfg.to_json(), "seconds_training": time.time() - started,
                               "train_loss": {k: sum(h.steps[-20:]) / len(h.steps[-20:]) for k, (_, _, h)
                                              in trained.items()}}
    if ddp.world()[0] == 0:
        metrics.update(evaluation(cfg, {k: (m, n) for k, (m, n, _) in trained.items()}))
        evaluate.learning_curves(cfg.out / "learning_curves.png", {k: {"steps": h.steps, "spikes": h.spikes} for k, (
            _, _, h) in trained.items()}, "training loss per step (spikes in red)")
    metrics["seconds"] = time.time() - started
    return metrics
