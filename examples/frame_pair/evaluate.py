"""Evaluation: end-point error and reconstruction PSNR for models and classical baselines; figures.

Every method predicts, for each pixel of the target frame, its coordinates in the source
image. **EPE** is the mean distance in pixels (of the 360x640 space) between predicted
and true coordinates; **PSNR** compares the target frame with the source sampled at the
predicted coordinates. The baselines answer the same question on the same pairs:

* ``identity``: nothing moved (its EPE is the size of the true motion);
* ``phase_correlation``: one global translation, ``skimage.registration.phase_cross_correlation``;
* ``tvl1`` and ``ilk``: classical dense optical flow (``optical_flow_tvl1``, ``optical_flow_ilk``)
  from the target frame to the source, on grayscale images, added to the pixel positions;
* ``copy_previous``: frame ``t - 1`` as the reconstruction of frame ``t`` (PSNR only; videos only).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .data import COORD_H, COORD_W, StereoPair, Video, identity_grid, model_input, slots, to_pixels, warp

BASELINES = ("identity", "phase_correlation", "tvl1", "ilk")


def epe_map(pred: Tensor, true: Tensor) -> Tensor:
    """``(H, W)`` end-point error in pixels of the 360x640 space."""
    return (to_pixels(pred) - to_pixels(true)).norm(dim=0)


def psnr(recon: Tensor, frame: Tensor, valid: Tensor | None = None) -> float:
    """PSNR in dB of ``recon`` against ``frame`` (``(3, H, W)`` in [0, 1]), over ``valid`` pixels if given."""
    err = (recon.clamp(0, 1) - frame).square().mean(0)
    mse = (err[valid] if valid is not None else err).mean().item()
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def full(coords: Tensor) -> Tensor:
    """Coordinates ``(2, h, w)`` at the coordinate resolution 360x640: the displacement from each pixel's
    own position is upsampled bilinearly (so the identity map stays exact, borders included)."""
    if tuple(coords.shape[-2:]) == (COORD_H, COORD_W):
        return coords
    shift = coords - identity_grid(*coords.shape[-2:]).to(coords)
    shift = F.interpolate(shift[None], size=(COORD_H, COORD_W), mode="bilinear", align_corners=False)[0]
    return identity_grid(COORD_H, COORD_W).to(coords) + shift


def _gray(image: Tensor, size: tuple[int, int]) -> np.ndarray:
    from skimage.color import rgb2gray

    small = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return rgb2gray(rearrange(small, "c h w -> h w c").numpy())


def baseline(name: str, frame: Tensor, source: Tensor, size: tuple[int, int]) -> Tensor:
    """``(2, 360, 640)`` coordinates of ``frame``'s pixels in ``source`` by a classical method, run at ``size``."""
    from skimage import registration

    h, w = size
    grid = identity_grid(h, w)
    if name == "identity":
        return identity_grid(COORD_H, COORD_W)
    target, moving = _gray(frame, size), _gray(source, size)
    if name == "phase_correlation":
        # the shift that registers the source with the frame: frame(p) = source(p - shift)
        dy, dx = registration.phase_cross_correlation(target, moving, upsample_factor=10)[0]
        flow = torch.tensor([-dx, -dy], dtype=torch.float32).view(2, 1, 1).expand(2, h, w)
    else:
        # frame(p) = source(p + flow(p)), flow as (rows, columns)
        method = {"tvl1": registration.optical_flow_tvl1, "ilk": registration.optical_flow_ilk}[name]
        v, u = method(target, moving)
        flow = torch.from_numpy(np.stack([u, v])).float()
    return full(grid + flow * torch.tensor([2 / w, 2 / h]).view(2, 1, 1))


@torch.no_grad()
def predict(model: nn.Module, frames: list[Tensor], size: tuple[int, int]) -> Tensor:
    """A model's ``(2, 360, 640)`` coordinates for frames ``(3, 360, 640)`` (slot 1 first), inputs at ``size``."""
    param = next(model.parameters())
    return full(model(model_input(frames, size)[None].to(param))[0].float().cpu())


Method = Callable[[list[Tensor], Tensor], Tensor]  # (frames by slot, source) -> coordinates


class Baseline:
    """A classical method as a :data:`Method` that keeps its result per (frame, source) pair: the figures
    reuse the pairs the scores computed, and :func:`precompute` runs many pairs at once."""

    def __init__(self, name: str, flow_size: tuple[int, int]) -> None:
        self.name, self.flow_size = name, flow_size
        self._done: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}  # the pair is kept: ids stay unique

    def __call__(self, frames: list[Tensor], source: Tensor) -> Tensor:
        key = (id(frames[0]), id(source))
        if key not in self._done:
            self._done[key] = (frames[0], source, baseline(self.name, frames[0], source, self.flow_size))
        return self._done[key][2]


def precompute(all_methods: dict[str, tuple[int, Method]], pairs: list[tuple[Tensor, Tensor]], workers: int = 2,
               ) -> None:
    """Run every :class:`Baseline` of ``all_methods`` on the (frame, source) ``pairs`` in ``workers`` threads
    (``optical_flow_tvl1`` spends its time in NumPy, which releases the GIL: 1.8x faster on 2 cores)."""
    jobs = [(method, frame, source) for _, method in all_methods.values() if isinstance(method, Baseline)
            for frame, source in pairs]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: job[0]([job[1]], job[2]), jobs))


def methods(models: dict[str, tuple[nn.Module, int]], size: tuple[int, int], flow_size: tuple[int, int],
            ) -> dict[str, tuple[int, Method]]:
    """Every method by name: ``(inputs it reads, function)``; the baselines read 2 (frame and source)."""
    out: dict[str, tuple[int, Method]] = {name: (2, Baseline(name, flow_size)) for name in BASELINES}
    for name, (model, n) in models.items():
        model.eval()
        out[name] = (n, lambda frames, source, model=model: predict(model, frames, size))
    return out


def score_videos(videos: list[Video], targets: list[int], all_methods: dict[str, tuple[int, Method]],
                 ) -> dict[str, dict[str, float | None]]:
    """Mean EPE and PSNR of every method over target frames ``targets`` of ``videos``, and copy-previous."""
    rows: dict[str, dict[str, list[float]]] = {}
    for video in videos:
        num_frames = len(video.frames)
        for t in targets:
            true = video.frames[t]
            for name, (n, method) in all_methods.items():
                coords = method([video.frames[u] for u in slots(t, num_frames, n)], video.image)
                row = rows.setdefault(name, {"epe": [], "psnr": []})
                row["epe"].append(epe_map(coords, video.coords[t]).mean().item())
                row["psnr"].append(psnr(warp(video.image, coords), true))
            rows.setdefault("copy_previous", {"psnr": []})["psnr"].append(psnr(video.frames[t - 1], true))
    return {name: {"epe": float(np.mean(r["epe"])) if "epe" in r else None, "psnr": float(np.mean(r["psnr"]))}
            for name, r in rows.items()}


def score_stereo(pair: StereoPair, all_methods: dict[str, tuple[int, Method]]) -> dict[str, dict[str, float]]:
    """EPE and PSNR over the pixels with a known disparity, for every method that reads at most 2 frames."""
    out = {}
    for name, (n, method) in all_methods.items():
        if n > 2:
            continue  # one stereo pair: nothing to show a model of more frames
        coords = method([pair.frame, pair.image][:n], pair.image)
        out[name] = {"epe": epe_map(coords, pair.coords)[pair.valid].mean().item(),
                     "psnr": psnr(warp(pair.image, coords), pair.frame, pair.valid)}
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)


def learning_curves(path: Path, curves: dict[str, dict[str, Any]], title: str) -> None:
    """One panel per run: per-step loss (log scale) with detected spikes marked in red."""
    plt = _pyplot()
    n = len(curves)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (label, run) in zip(axes.flat, curves.items()):
        ax.plot(run["steps"], lw=0.8)
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
    _save(fig, path)


@torch.no_grad()
def figures(out: Path, video: Video, t: int, pair: StereoPair, all_methods: dict[str, tuple[int, Method]]) -> None:
    """``heldout_reconstructions.png`` (each method's reconstruction of held-out frame ``t``) and
    ``epe_maps.png`` (its end-point error per pixel, same colour scale per row; second row: the
    Middlebury pair)."""
    plt = _pyplot()
    predictions = {name: method([video.frames[u] for u in slots(t, len(video.frames), n)], video.image)
                   for name, (n, method) in all_methods.items()}
    panels = [(f"held-out '{video.name}', frame {t}", video.frames[t]), ("source (frame 0)", video.image)]
    panels += [(f"{name} ({epe_map(c, video.coords[t]).mean():.2f} px)", warp(video.image, c))
               for name, c in predictions.items()]
    cols = 4
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(4 * cols, 2.4 * ((len(panels) + 3) // 4)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image) in zip(axes.flat, panels):
        ax.imshow(rearrange(image.clamp(0, 1), "c h w -> h w c").numpy())
        ax.set_title(title, fontsize=8)
    _save(fig, out / "heldout_reconstructions.png")

    stereo = {name: method([pair.frame, pair.image][:n], pair.image) for name, (n, method) in all_methods.items()
              if n <= 2}
    rows = [(f"held-out '{video.name}' frame {t}", {k: epe_map(c, video.coords[t]) for k, c in predictions.items()}),
            (pair.name, {k: torch.where(pair.valid, epe_map(c, pair.coords), torch.nan) for k, c in stereo.items()})]
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(2, cols, figsize=(2.4 * cols + 1, 3.6), squeeze=False, layout="constrained")
    for row, (label, maps) in zip(axes, rows):
        top = float(np.nanpercentile(torch.stack(list(maps.values())).numpy(), 99))
        for ax in row:
            ax.axis("off")
        for ax, (name, m) in zip(row, maps.items()):
            image = ax.imshow(m.numpy(), cmap="magma", vmin=0, vmax=top)
            ax.set_title(f"{name}: {np.nanmean(m.numpy()):.2f} px", fontsize=8)
        fig.colorbar(image, ax=row.tolist(), shrink=0.9, pad=0.01).set_label(f"EPE px\n{label}", fontsize=7)
    fig.savefig(out / "epe_maps.png", dpi=80)
    plt.close(fig)
