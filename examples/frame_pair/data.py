"""Frame sequences with known coordinate maps, made from scikit-image's photos (no downloads).

Each source photo is one "video". Frame ``t`` of a video shows the photo seen
through a known coordinate map: pixel ``(x, y)`` of the frame shows the photo's
point ``coords_t[y, x]`` in the photo's own coordinate space (``COORD_H x COORD_W``,
360x640 as in the study). The map is a smooth global motion (rotation, zoom and
drift growing with ``t``) plus small random-looking per-point shifts: a coarse grid
of random offsets, a few pixels large, interpolated between the points.

Coordinates are stored normalized to ``[-1, 1]`` (``grid_sample`` convention,
``align_corners=False``); :func:`to_pixels` converts them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

COORD_H, COORD_W = 360, 640
VIDEOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle")


def photo(name: str) -> Tensor:
    """A scikit-image photo, center-cropped to 16:9 and resized to ``(3, 360, 640)`` in ``[0, 1]``."""
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float().div(255)
    h, w = x.shape[1:]
    if w / h > COORD_W / COORD_H:
        cw = round(h * COORD_W / COORD_H)
        x = x[:, :, (w - cw) // 2 : (w - cw) // 2 + cw]
    else:
        ch = round(w * COORD_H / COORD_W)
        x = x[:, (h - ch) // 2 : (h - ch) // 2 + ch]
    return F.interpolate(x[None], size=(COORD_H, COORD_W), mode="bilinear", antialias=True, align_corners=False)[0]


def identity_grid(h: int, w: int) -> Tensor:
    """``(2, h, w)`` normalized coordinates of pixel centres (x first)."""
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])


def coordinate_map(gen: torch.Generator, t: int, motion: Tensor, shift_px: float = 3.0) -> Tensor:
    """``(2, 360, 640)`` normalized coordinates of frame ``t``: global motion + per-point shifts."""
    angle, zoom, dx, dy = (motion * t).tolist()
    base = identity_grid(COORD_H, COORD_W)
    aspect = COORD_W / COORD_H
    x, y = base[0] * aspect, base[1]  # rotate in an isotropic frame
    c, s = np.cos(angle), np.sin(angle)
    gx = ((c * x - s * y) / (1 + zoom)) / aspect + dx
    gy = (s * x + c * y) / (1 + zoom) + dy
    coarse = torch.randn(1, 2, 10, 17, generator=gen) * shift_px  # one offset per ~40 px, in pixels
    shifts = F.interpolate(coarse, size=(COORD_H, COORD_W), mode="bicubic", align_corners=True)[0]
    return torch.stack([gx + shifts[0] * 2 / COORD_W, gy + shifts[1] * 2 / COORD_H])


def warp(image: Tensor, coords: Tensor) -> Tensor:
    """Sample ``image`` ``(C, H, W)`` at normalized ``coords`` ``(2, h, w)``."""
    grid = coords.permute(1, 2, 0)[None].to(image.dtype)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def to_pixels(coords: Tensor) -> Tensor:
    """Normalized coordinates -> pixel coordinates of the 360x640 space (same shape)."""
    scale = torch.tensor([COORD_W / 2, COORD_H / 2], dtype=coords.dtype, device=coords.device)
    shape = (2,) + (1,) * (coords.ndim - 1) if coords.shape[0] == 2 else (1, 2) + (1,) * (coords.ndim - 2)
    return (coords + 1) * scale.view(shape)


@dataclass
class Video:
    """A photo and its frames: ``frames[t]`` ``(3, 360, 640)`` shows the photo at ``coords[t]``."""

    name: str
    image: Tensor
    frames: list[Tensor]
    coords: list[Tensor]


def make_video(name: str, num_frames: int, seed: int) -> Video:
    """Frames ``0..num_frames-1``; frame 0 is the photo itself (the identity map)."""
    gen = torch.Generator().manual_seed(seed)
    image = photo(name)
    # per-video motion per frame: rotation (rad), zoom, drift x, drift y (normalized units)
    motion = (torch.rand(4, generator=gen) * 2 - 1) * 0.005
    coords = [identity_grid(COORD_H, COORD_W)] + [coordinate_map(gen, t, motion) for t in range(1, num_frames)]
    return Video(name, image, [warp(image, c) for c in coords], coords)


@dataclass
class Sample:
    """One training example: ``inputs`` ``(N*3, h, w)`` and the target map ``(2, h, w)``.

    Input slot 1 is the frame whose coordinates are predicted; slots 2..N hold other
    frames of the same video, frame 0 (the photo itself) first.
    """

    video: str
    frame: int
    inputs: Tensor
    target: Tensor


def samples(videos: list[Video], num_inputs: int, size: tuple[int, int]) -> list[Sample]:
    """Every frame ``t >= 1`` of every video as a target, with ``num_inputs - 1`` context frames.

    Frames and targets are resized to ``size``; target values stay coordinates of
    the 360x640 space (as in the study's 120x240 runs).
    """
    out = []
    for video in videos:
        t_max = len(video.frames)
        if num_inputs > t_max:
            raise ValueError(f"num_inputs: expected at most {t_max} (frames per video), got {num_inputs}")
        for t in range(1, t_max):
            context = [0] + [u for u in range(1, t_max) if u != t]
            chosen = [t] + context[: num_inputs - 1]
            frames = torch.cat([video.frames[u] for u in chosen])
            out.append(Sample(video.name, t, _resize(frames, size), _resize(video.coords[t], size)))
    return out


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
