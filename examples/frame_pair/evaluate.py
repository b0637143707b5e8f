"""Evaluation: reconstruct frames from predicted coordinates and score them; plots and pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import Video, identity_grid, to_pixels, warp


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).square().mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), channel_axis=2,
                                       data_range=1.0))


def epe(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean end-point error in pixels of the 360x640 coordinate space."""
    return (to_pixels(pred) - to_pixels(true)).norm(dim=0).mean().item()


def _full(coords: torch.Tensor) -> torch.Tensor:
    """Predicted coordinates at the coordinate resolution (upsampled if the input was smaller)."""
    if coords.shape[-2:] == (360, 640):
        return coords
    return torch.nn.functional.interpolate(coords[None], size=(360, 640), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def score(model: nn.Module | None, videos: list[Video], num_inputs: int, size: tuple[int, int]) -> dict[str, float]:
    """Mean PSNR/SSIM of reconstructed frames and EPE; ``model=None`` scores the baselines.

    The reconstruction of frame ``t`` samples the source photo at the predicted
    coordinates. Baselines: copying the previous frame ``t-1`` (PSNR, SSIM) and the
    identity map (EPE, and its reconstruction, which is the photo itself).
    """
    from .data import samples

    rows: dict[str, list[float]] = {}
    for video in videos:
        items = samples([video], max(num_inputs, 1), size)
        for item in items:
            t = item.frame
            true_frame = video.frames[t]
            if model is None:
                pairs = {"copy_prev": (video.frames[t - 1], None), "identity": (None, identity_grid(360, 640))}
            else:
                param = next(model.parameters())
                coords = _full(model(item.inputs[None].to(param))[0].float().cpu())
                pairs = {"model": (None, coords)}
            for name, (frame, coords) in pairs.items():
                recon = frame if coords is None else warp(video.image, coords)
                rows.setdefault(f"{name}_psnr", []).append(psnr(recon.clamp(0, 1), true_frame))
                rows.setdefault(f"{name}_ssim", []).append(ssim(recon.clamp(0, 1), true_frame))
                if coords is not None:
                    rows.setdefault(f"{name}_epe", []).append(epe(coords, video.coords[t]))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def learning_curves(path: Path, curves: dict[str, dict[str, Any]], title: str) -> None:
    """One panel per run: per-step loss (log scale) with detected spikes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (label, run) in zip(axes.flat, curves.items()):
        ax.plot(run["steps"], lw=1)
        spikes = run.get("spikes", [])
        ax.scatter([s["step"] for s in spikes], [s["loss"] for s in spikes], color="red", s=18, zorder=3,
                   label=f"{len(spikes)} spikes")
        ax.set_yscale("log")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def pictures(path: Path, models: dict[str, tuple[nn.Module, int]], video: Video, size: tuple[int, int]) -> None:
    """Input frame, true frame and each model's reconstruction, for frame 1 of ``video``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import samples

    panels = [("input: frame 1", video.frames[1]), ("source photo (frame 0)", video.image)]
    for name, (model, n) in models.items():
        item = samples([video], n, size)[0]
        coords = _full(model(item.inputs[None].to(next(model.parameters())))[0].float().cpu())
        panels.append((f"{name}: reconstruction (EPE {epe(coords, video.coords[1]):.2f} px)",
                       warp(video.image, coords)))
    panels.append(("true frame 1", video.frames[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 2.6))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
