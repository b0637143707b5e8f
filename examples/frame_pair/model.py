"""The coordinate network: an ImageNet-pretrained EfficientNet-Lite0 encoder and a light FPN decoder.

The network predicts, for every input pixel, an offset from that pixel's own
position; the coordinate map is the identity grid plus that offset (so a
translation-equivariant network can express absolute coordinates). As in flow
and segmentation networks, the head predicts at the decoder's finest resolution
(half the input's) and the prediction is upsampled bilinearly to the input size,
where the loss is taken. The offset is predicted in scaled units
(``OFFSET_SCALE``, also the unit of the loss), and the head, a 1x1 conv, reads
unit-length feature vectors: the loss curvature in its weights is then at most 2,
so plain SGD at the study's lr 0.101 is stable on the last layer whatever the
earlier layers learned.
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
    return F.mse_loss(pred, target) / OFFSET_SCALE**2


class CoordNet(nn.Module):
    """Frames ``(B, N*3, H, W)`` in ``[0, 1]`` -> coordinate map ``(B, 2, H, W)`` (normalized)."""

    def __init__(self, pretrained: bool = True, width: int = 32) -> None:
        super().__init__()
        encoder = efficientnet_lite0() if pretrained else __import__("timm").create_model("tf_efficientnet_lite0")
        self.stem = nn.Sequential(encoder.conv_stem, encoder.bn1)
        self.blocks = encoder.blocks
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in TAP_CHANNELS)
        self.refine = nn.Sequential(nn.Conv2d(width, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 2, 1)
        nn.init.zeros_(self.head.weight)  # start from the identity map
        nn.init.zeros_(self.head.bias)

    def new_head(self, seed: int) -> None:
        """Re-initialize the head (PyTorch's default init, drawn on the CPU from ``seed``).

        Early in training one frame tells little about the motion, so the single-frame model
        drives its head to about zero; from there, a model that could read the motion gets almost
        no gradient through the head to learn to (side runs: the zero-inflated pair stayed at the
        identity's loss for 1000 steps). From a fresh head it does, after a plateau.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = nn.Conv2d(self.head.in_channels, self.head.out_channels, 1)
        self.head.load_state_dict(fresh.state_dict())

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
        y = F.normalize(self.refine(y), dim=1)  # unit feature vectors: the head's curvature stays bounded
        # Channels-last makes the 1x1 head a plain matrix product: on CPU, forward and backward of a
        # two-output-channel 1x1 conv are about 10x faster than on NCHW features (bilinear
        # upsampling, in turn, is faster on NCHW).
        offset = self.head(y.contiguous(memory_format=torch.channels_last)).contiguous()
        offset = F.interpolate(offset, size=frames.shape[-2:], mode="bilinear", align_corners=False)
        grid = identity_grid(frames.shape[-2], frames.shape[-1], frames.device).to(frames.dtype)
        return grid + offset * OFFSET_SCALE
