"""The coordinate network: an ImageNet-pretrained EfficientNet-Lite0 encoder and a light FPN decoder.

The network predicts, for every input pixel, an offset from that pixel's own
position; the coordinate map is the identity grid plus that offset (so a
translation-equivariant network can express absolute coordinates). As in flow
networks, the offset is predicted in scaled units (``OFFSET_SCALE``, also the
unit of the loss), and the head reads unit-length feature vectors: the loss
curvature in the head's weights is then at most 9 (a 3x3 kernel), so plain SGD at
the study's lr 0.101 is stable on the last layer whatever the earlier layers
learned. The last layer is that 3x3 conv at full resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pretrained import efficientnet_lite0
from .data import identity_grid

TAPS = (0, 1, 2, 4, 6)  # encoder blocks whose outputs feed the decoder (strides 2, 4, 8, 16, 32)
TAP_CHANNELS = (16, 24, 40, 112, 320)
MEAN, STD = 0.5, 0.5  # tf_efficientnet_lite0 normalization
OFFSET_SCALE = 0.05  # head output unit, in normalized coordinates (16 px of the 640-px width)


def coordinate_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of coordinates, in units of ``OFFSET_SCALE`` (16 px across, 9 px down)."""
    return F.mse_loss(pred / OFFSET_SCALE, target / OFFSET_SCALE)


class CoordNet(nn.Module):
    """Frames ``(B, N*3, H, W)`` in ``[0, 1]`` -> coordinate map ``(B, 2, H, W)`` (normalized)."""

    def __init__(self, pretrained: bool = True, width: int = 32) -> None:
        super().__init__()
        encoder = efficientnet_lite0() if pretrained else __import__("timm").create_model("tf_efficientnet_lite0")
        self.stem = nn.Sequential(encoder.conv_stem, encoder.bn1)
        self.blocks = encoder.blocks
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in TAP_CHANNELS)
        self.refine = nn.Sequential(nn.Conv2d(width, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 2, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # start from the identity map
        nn.init.zeros_(self.head.bias)

    def forward(self, frames: Tensor) -> Tensor:
        x = self.stem((frames - MEAN) / STD)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in TAPS:
                taps.append(x)
        y = self.lateral[-1](taps[-1])
        for tap, lateral in zip(reversed(taps[:-1]), reversed(list(self.lateral)[:-1])):
            y = F.interpolate(y, size=tap.shape[-2:], mode="bilinear", align_corners=False) + lateral(tap)
        y = F.interpolate(self.refine(y), size=frames.shape[-2:], mode="bilinear", align_corners=False)
        y = F.normalize(y, dim=1)  # unit feature vectors: the head's curvature no longer depends on training
        grid = identity_grid(frames.shape[-2], frames.shape[-1]).to(frames)
        return grid + self.head(y) * OFFSET_SCALE
