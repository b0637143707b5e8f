"""The study's two experiments, on a fixed set of samples (the study overfits a fixed set):
the equivalence check and the fine-tuning sweep. Both start from the stored single-frame model."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .config import RunConfig
from .data import training_batch
from .fit import FitConfig, fit
from .pipeline import device, inflated

POLICIES = ("last", "first+last", "first+second+last", "all")


def fixed_set(cfg: RunConfig, num_inputs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``cfg.study_batches`` batches of the stream the study commands use (the same samples for any inputs)."""
    return [training_batch(cfg.seed * 100 + 2, i, cfg.batch_size, cfg.frames, num_inputs, cfg.size,
                           cfg.training_photos) for i in range(cfg.study_batches)]


def equivalence(cfg: RunConfig, single: nn.Module) -> dict[str, Any]:
    """Single-input vs two-input with zeroed second-half weights, last layer only, SGD lr 0.101, trained
    identically; and a control inflated with the study's plain ``weight.repeat(1, 2, 1, 1)``."""
    epochs = cfg.study_epochs
    fit_cfg = FitConfig(policy="last", optimizer="sgd", lr=0.101, steps=epochs * cfg.study_batches,
                        spike_window=max(cfg.study_batches, 2))
    one, two = copy.deepcopy(single), inflated(single, 2, "zero")
    control = inflated(single, 2, "repeat", scale=False)
    data1, data2 = fixed_set(cfg, 1), fixed_set(cfg, 2)
    h1 = fit(one, data1, fit_cfg, progress="single-input")
    h2 = fit(two, data2, fit_cfg, progress="two-input (zeroed)")
    hc = fit(control, data2, fit_cfg, progress="two-input (repeat)")
    with torch.no_grad():
        one.eval(), two.eval()
        pred_diff = max((one(x1.to(device())) - two(x2.to(device()))).abs().max().item()
                        for (x1, _), (x2, _) in zip(data1, data2))
    curves = {k: h.means(cfg.study_batches) for k, h in (("single", h1), ("zeroed", h2), ("repeat_control", hc))}
    last = {k: v[-1] for k, v in curves.items()}
    return {**last, "diff": abs(last["single"] - last["zeroed"]),
            "control_diff": abs(last["single"] - last["repeat_control"]),
            "max_prediction_diff": pred_diff, "epochs": epochs, "curves": curves}


def sweep(cfg: RunConfig, single: nn.Module, clip_value: float = 0.01) -> list[dict[str, Any]]:
    """Policies x lr {0.101, 0.05} x {no clipping, value clipping}, SGD: final losses and curves."""
    data = fixed_set(cfg, 2)
    results = []
    for policy in POLICIES:
        for lr in (0.101, 0.05):
            for clip in (None, clip_value):
                fit_cfg = FitConfig(policy=policy, optimizer="sgd", lr=lr, clip_value=clip,
                                    steps=cfg.study_epochs * cfg.study_batches, spike_window=max(cfg.study_batches, 2))
                history = fit(inflated(single, 2, "zero"), data, fit_cfg, progress=f"{policy} lr={lr} clip={clip}")
                results.append({"policy": policy, "lr": lr, "clip": clip,
                                "final": history.means(cfg.study_batches)[-1],
                                "steps": history.steps, "spikes": history.spikes, "trainable": history.trainable})
    return results
