"""Frames with known coordinate maps, made from scikit-image's images (nothing is downloaded).

A "video" is a source image (360x640, the coordinate space ``COORD_H x COORD_W`` of the
study) seen through a moving camera: pixel ``(x, y)`` of frame ``t`` shows the source's
point ``coords_t[y, x]``. Frame 0 is the source itself (the identity map). Every frame is a
window into a larger canvas (the source and a margin of ``MARGIN`` of its size on every
side, cut from the same photo), so what a motion brings into view is real image content:
no frame repeats its edge, which would tell a single frame about the motion. The motion is
drawn per video (FlyingChairs-style): a global rotation, zoom and drift that grow with
``t``, small local shifts (a coarse grid of random offsets, interpolated), and a few
elliptic regions that move on their own, with motion boundaries at their edges.

Photos are split by name: ``TRAIN_PHOTOS`` feed training, ``HELDOUT_PHOTOS`` are never
seen in training. Training draws every sample afresh (:func:`training_batch`): a random
crop and flip of a training photo, colour jitter, a new motion, a random target frame;
the sample of step ``s`` depends only on ``(seed, s)``, so a resumed run sees the same
data, and it is made on the device the model trains on (the random draws stay on the CPU:
only their rounding depends on the device). :func:`stereo_pair` is the real data: the
Middlebury motorcycle pair with its true disparity.

Coordinates are normalized to ``[-1, 1]`` (``grid_sample``, ``align_corners=False``);
:func:`to_pixels` converts them to pixels of the 360x640 space.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .config import HELDOUT_PHOTOS, TRAIN_PHOTOS  # noqa: F401 (re-exported)

COORD_H, COORD_W = 360, 640
MOTION = {"angle": 0.04, "zoom": 0.04, "drift": 0.04, "shift_px": 2.0, "object_px": 12.0}  # at the last frame
# The canvas margin, a fraction of the frame's size on each side. The motions above reach at most
# 1.10 (x) and 1.15 (y) in normalized coordinates (3,000 draws); the canvas spans 1.25.
MARGIN = 0.125


def _image(name: str) -> Tensor:
    """A scikit-image image as ``(3, H, W)`` float in ``[0, 1]`` (grayscale repeated, alpha dropped)."""
    from skimage import data

    image = np.asarray(getattr(data, name)())
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)


@cache
def _cached(name: str, device: str = "cpu") -> Tensor:
    return _image(name) if device == "cpu" else _cached(name).to(device)


def _largest(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """The largest box of ``size``'s aspect ratio in an ``h x w`` image."""
    return (h, round(h * size[1] / size[0])) if w / h > size[1] / size[0] else (round(w * size[0] / size[1]), w)


def _fit(image: Tensor, box: tuple[int, int, int, int] | None = None,
         size: tuple[int, int] = (COORD_H, COORD_W)) -> Tensor:
    """Crop ``image`` to ``box`` = (top, left, height, width) (default: the largest central box of
    ``size``'s shape), resize to ``size``."""
    h, w = image.shape[1:]
    if box is None:
        ch, cw = _largest(h, w, size)
        box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
    top, left, ch, cw = box
    crop = image[:, top : top + ch, left : left + cw]
    return F.interpolate(crop[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def canvas_size(size: tuple[int, int]) -> tuple[int, int]:
    """The canvas of frames of ``size``: ``size`` and ``round(MARGIN * size)`` pixels on every side."""
    h, w = size
    return h + 2 * round(h * MARGIN), w + 2 * round(w * MARGIN)


def window(canvas: Tensor, size: tuple[int, int]) -> Tensor:
    """The centre ``size`` pixels of ``canvas`` ``(C, H, W)``: frame 0, the identity map."""
    (h, w), (ch, cw) = size, canvas_size(size)
    if tuple(canvas.shape[-2:]) != (ch, cw):
        raise ValueError(f"canvas of {size} frames: expected {ch}x{cw} pixels, got {tuple(canvas.shape[-2:])}")
    top, left = (ch - h) // 2, (cw - w) // 2
    return canvas[:, top : top + h, left : left + w]


def view(canvas: Tensor, coords: Tensor) -> Tensor:
    """The frame that shows ``canvas`` at ``coords`` ``(2, h, w)``, normalized in the ``(h, w)`` window."""
    h, w = coords.shape[-2:]
    ch, cw = canvas.shape[-2:]
    scale = torch.tensor([w / cw, h / ch], dtype=coords.dtype, device=coords.device).view(2, 1, 1)
    return warp(canvas, coords * scale)


def photo_canvas(name: str) -> Tensor:
    """A scikit-image photo's largest centred box of the canvas's shape, resized to the canvas of 360x640."""
    return _fit(_cached(name), size=canvas_size((COORD_H, COORD_W)))


def identity_grid(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """``(2, h, w)`` normalized coordinates of pixel centres (x first)."""
    ys = (torch.arange(h, device=device) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])


@dataclass
class Motion:
    """One video's motion, drawn once; :meth:`coords` gives frame ``t`` of ``num_frames``.

    ``angle``, ``zoom``, ``drift`` (normalized x, y) and each object's ``object_shift`` (pixels)
    are the values at the last frame; frame ``t`` moves by the fraction ``t / (num_frames - 1)``.
    ``shifts`` holds one coarse grid of local offsets (pixels) per frame.
    """

    num_frames: int
    angle: float
    zoom: float
    drift: tuple[float, float]
    shifts: Tensor  # (num_frames, 2, 10, 17) pixels
    objects: Tensor  # (K, 6): centre x, y (normalized), radii x, y (normalized), shift x, y (pixels)

    @classmethod
    def draw(cls, gen: torch.Generator, num_frames: int, strength: float = 1.0) -> Motion:
        def uniform(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=gen) * 2 - 1

        g = uniform(4) * strength
        shifts = torch.randn(num_frames, 2, 10, 17, generator=gen) * MOTION["shift_px"] * strength
        k = int(torch.randint(0, 4, (1,), generator=gen))
        objects = torch.cat([uniform(k, 2) * 0.7, 0.1 + 0.25 * torch.rand(k, 2, generator=gen),
                             uniform(k, 2) * MOTION["object_px"] * strength], dim=1)
        return cls(num_frames, float(g[0]) * MOTION["angle"], float(g[1]) * MOTION["zoom"],
                   (float(g[2]) * MOTION["drift"], float(g[3]) * MOTION["drift"]), shifts, objects)

    def coords(self, t: int, size: tuple[int, int] = (COORD_H, COORD_W),
               device: torch.device | str | None = None) -> Tensor:
        """``(2, *size)`` normalized coordinates of frame ``t`` in the source, at the pixel centres of a
        ``size`` grid (the map is a function of the position: any grid samples it exactly)."""
        base = identity_grid(*size, device=device)
        if t == 0:
            return base
        s = t / max(self.num_frames - 1, 1)
        aspect = COORD_W / COORD_H
        x, y = base[0] * aspect, base[1]  # rotate in an isotropic frame
        c, si = np.cos(self.angle * s), np.sin(self.angle * s)
        gx = (c * x - si * y) / (1 + self.zoom * s) / aspect + self.drift[0] * s
        gy = (si * x + c * y) / (1 + self.zoom * s) + self.drift[1] * s
        shifts = F.interpolate(self.shifts[t][None].to(base.device), size=size, mode="bicubic", align_corners=True)[0]
        for cx, cy, rx, ry, sx, sy in self.objects.tolist():
            inside = ((base[0] - cx) / rx) ** 2 + ((base[1] - cy) / ry) ** 2 <= 1
            shifts = shifts + inside * torch.tensor([sx * s, sy * s], device=base.device).view(2, 1, 1)
        return torch.stack([gx + shifts[0] * 2 / COORD_W, gy + shifts[1] * 2 / COORD_H])


def warp(image: Tensor, coords: Tensor) -> Tensor:
    """Sample ``image`` ``(C, H, W)`` at normalized ``coords`` ``(2, h, w)``."""
    grid = rearrange(coords, "two h w -> 1 h w two").to(image.dtype)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def to_pixels(coords: Tensor) -> Tensor:
    """Normalized coordinates ``(2, ...)`` or ``(B, 2, ...)`` -> pixels of the 360x640 space."""
    scale = torch.tensor([COORD_W / 2, COORD_H / 2], dtype=coords.dtype, device=coords.device)
    shape = (2,) + (1,) * (coords.ndim - 1) if coords.shape[0] == 2 else (1, 2) + (1,) * (coords.ndim - 2)
    return (coords + 1) * scale.view(shape)


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``(C, H, W)`` -> ``(C, *size)``, antialiased (coordinate values are kept, not rescaled)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


@dataclass
class Video:
    """A source image and its frames: ``frames[t]`` ``(3, 360, 640)`` shows ``image`` (frame 0) at
    ``coords[t]``; the frames are views of ``canvas``, so they show what lies outside ``image`` too."""

    name: str
    image: Tensor
    frames: list[Tensor]
    coords: list[Tensor]
    canvas: Tensor


def make_video(name: str, num_frames: int, seed: int, canvas: Tensor | None = None) -> Video:
    """Frames ``0..num_frames-1`` of photo ``name`` (or of ``canvas``, 450x800) under a motion drawn from ``seed``."""
    canvas = photo_canvas(name) if canvas is None else canvas
    motion = Motion.draw(torch.Generator().manual_seed(seed), num_frames)
    coords = [motion.coords(t) for t in range(num_frames)]
    image = window(canvas, (COORD_H, COORD_W))
    return Video(name, image, [image] + [view(canvas, c) for c in coords[1:]], coords, canvas)


def slots(t: int, num_frames: int, num_inputs: int) -> list[int]:
    """The frames a model with ``num_inputs`` inputs reads for target ``t``: ``t``, then 0, then the others."""
    if not 1 <= num_inputs <= num_frames:
        raise ValueError(f"num_inputs: expected 1 to {num_frames} (frames per video), got {num_inputs}")
    return ([t] + [0] + [u for u in range(1, num_frames) if u != t])[:num_inputs]


def model_input(frames: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Frames ``(3, H, W)`` -> one input ``(N*3, *size)``: stacked along channels, slot 1 first."""
    return resize(torch.cat(frames), size)


def eval_targets(num_frames: int, count: int = 3) -> list[int]:
    """The target frames scored per evaluation video: ``count`` of them, evenly spaced, the last included."""
    return sorted({round(num_frames - 1 - i * (num_frames - 1) / count) for i in range(count)} - {0})


def _jitter(gen: torch.Generator, image: Tensor) -> Tensor:
    """Brightness, contrast, saturation and a colour tint, each drawn per sample."""
    b, c, s = (0.7 + 0.6 * torch.rand(3, generator=gen)).tolist()
    tint = (0.85 + 0.3 * torch.rand(3, 1, 1, generator=gen)).to(image.device)
    gray = image.mean(0, keepdim=True)
    image = gray + (image - gray) * s
    image = (image - image.mean()) * c + image.mean()
    return (image * b * tint).clamp(0, 1)


def augmented_canvas(gen: torch.Generator, photos: tuple[str, ...], size: tuple[int, int],
                     device: torch.device | str = "cpu") -> Tensor:
    """The canvas of frames of ``size``: a random crop (60-100% of the largest) of a random photo,
    resized to ``canvas_size(size)``, flipped half the time, colour-jittered, on ``device``."""
    image = _cached(photos[int(torch.randint(len(photos), (1,), generator=gen))], str(torch.device(device)))
    h, w = image.shape[1:]
    size = canvas_size(size)
    ch0, cw0 = _largest(h, w, size)
    scale = 0.6 + 0.4 * float(torch.rand(1, generator=gen))
    ch, cw = max(16, round(ch0 * scale)), max(16, round(cw0 * scale))
    top = int(torch.randint(h - ch + 1, (1,), generator=gen))
    left = int(torch.randint(w - cw + 1, (1,), generator=gen))
    source = _fit(image, (top, left, ch, cw), size)
    if torch.rand(1, generator=gen) < 0.5:
        source = source.flip(-1)
    return _jitter(gen, source)


def training_sample(seed: int, index: int, num_frames: int, num_inputs: int, size: tuple[int, int],
                    photos: tuple[str, ...] = TRAIN_PHOTOS,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Sample ``index`` of the stream ``seed``: input ``(num_inputs*3, *size)``, target ``(2, *size)``.

    Depends only on its arguments, and models with different ``num_inputs`` get the same
    source, motion and target frame (slot 1 is the same frame for all). Everything is made
    at ``size`` directly (the canvas resized once, then warped), which is 4x cheaper than
    warping at 360x640 and resizing for inputs of half that size. The random draws are made on
    the CPU, the images on ``device`` (at 360x640, ten frames take 0.3 s a sample on a CPU core).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    canvas = augmented_canvas(gen, photos, size, device)
    motion = Motion.draw(gen, num_frames)
    t = int(torch.randint(1, num_frames, (1,), generator=gen))
    target = motion.coords(t, size, device)
    frames = [window(canvas, size) if u == 0 else view(canvas, target if u == t else motion.coords(u, size, device))
              for u in slots(t, num_frames, num_inputs)]
    return torch.cat(frames), target


def training_batch(seed: int, step: int, batch_size: int, num_frames: int, num_inputs: int, size: tuple[int, int],
                   photos: tuple[str, ...] = TRAIN_PHOTOS, part: tuple[int, int] = (0, 1),
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The batch of ``step`` on ``device``; with ``part=(rank, world)``, that process's share of it."""
    rank, world = part
    if batch_size % world:
        raise ValueError(f"batch of {batch_size} samples cannot be split evenly over {world} processes")
    share = batch_size // world
    items = [training_sample(seed, step * batch_size + i, num_frames, num_inputs, size, photos, device)
             for i in range(rank * share, (rank + 1) * share)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


@dataclass
class StereoPair:
    """The Middlebury motorcycle pair at 360x640: predict the left image's coordinates in the right one.

    ``frame`` (left) shows ``image`` (right) at ``coords``: left pixel ``x`` is right pixel
    ``x - disparity``. The true disparity is given on the left view, so this direction is
    the exact one; ``valid`` marks pixels with a known disparity.
    """

    name: str
    image: Tensor  # right view (the source)
    frame: Tensor  # left view
    coords: Tensor  # (2, 360, 640) normalized
    valid: Tensor  # (360, 640) bool


def stereo_pair() -> StereoPair:
    """``skimage.data.stereo_motorcycle()`` cropped to 16:9 and resized to 360x640 (disparity scaled alike)."""
    from skimage import data

    left, right, disparity = data.stereo_motorcycle()
    h, w = disparity.shape
    ch = round(w * COORD_H / COORD_W)
    box = ((h - ch) // 2, 0, ch, w)
    disp = torch.from_numpy(np.ascontiguousarray(disparity))[None].float()
    disp = disp[:, box[0] : box[0] + ch]
    valid = torch.isfinite(disp)
    # nearest resampling keeps every disparity a measured one; the scale is that of the resize
    disp = F.interpolate(torch.where(valid, disp, 0)[None], size=(COORD_H, COORD_W), mode="nearest")[0, 0] * COORD_W / w
    valid = F.interpolate(valid[None].float(), size=(COORD_H, COORD_W), mode="nearest")[0, 0] > 0.5
    coords = identity_grid(COORD_H, COORD_W)
    coords = torch.stack([coords[0] - disp * 2 / COORD_W, coords[1]])
    views = [torch.from_numpy(np.ascontiguousarray(v)).permute(2, 0, 1).float().div(255) for v in (right, left)]
    return StereoPair("motorcycle (Middlebury)", _fit(views[0], box), _fit(views[1], box), coords, valid)
