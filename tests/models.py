"""Small hand-written models with the stems the library must handle or refuse."""

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn


class Branches(nn.Module):
    """RepVGG-style: three parallel convs read the input, outputs summed."""

    def __init__(self, c=3):
        super().__init__()
        self.k3 = nn.Conv2d(c, 8, 3, padding=1)
        self.k1 = nn.Conv2d(c, 8, 1, bias=False)
        self.pool_conv = nn.Conv2d(c, 8, 1)
        self.head = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.head(self.k3(x) + self.k1(x) + self.pool_conv(F.avg_pool2d(x, 3, 1, 1)))


class PatchLinear(nn.Module):
    """ViT-style linear patch embedding on flattened patches."""

    def __init__(self, c=3, p=4, pattern="b c (h p1) (w p2) -> b (h w) (p1 p2 c)", norm=False):
        super().__init__()
        self.to_patches = Rearrange(pattern, p1=p, p2=p)
        self.norm = nn.LayerNorm(p * p * c) if norm else nn.Identity()
        self.embed = nn.Linear(p * p * c, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(F.gelu(self.embed(self.norm(self.to_patches(x)))).mean(1))


class SpaceToDepth(nn.Module):
    """TResNet-style space-to-depth (view/permute), or pixel_unshuffle, then a conv."""

    def __init__(self, c=3, r=2, unshuffle=False):
        super().__init__()
        self.r, self.unshuffle = r, unshuffle
        self.conv = nn.Conv2d(c * r * r, 8, 3, padding=1)

    def forward(self, x):
        if self.unshuffle:
            x = F.pixel_unshuffle(x, self.r)
        else:
            b, c, h, w = x.shape
            r = self.r
            x = x.view(b, c, h // r, r, w // r, r).permute(0, 3, 5, 1, 2, 4).reshape(b, c * r * r, h // r, w // r)
        return self.conv(x).relu()


class StdConv(nn.Conv2d):
    """Weight-standardized conv (as BiT / NF-Nets): the weight used is computed in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Normalized(nn.Module):
    """A channel-specific input transform before the first conv, made in the forward from
    Python numbers: nothing inflate could widen per input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x - torch.tensor([0.4, 0.5, 0.6], dtype=x.dtype, device=x.device).view(1, 3, 1, 1))


class Shared(nn.Module):
    """One conv applied to the input and again to its own output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x).relu())


class InputSkip(nn.Module):
    """The input is concatenated with features (DenseNet-style input skip)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(7, 4, 1)

    def forward(self, x):
        return self.b(torch.cat([x, self.a(x)], 1))


class DataDependent(nn.Module):
    """Control flow on weight values: cannot run on the meta device, exact all the same."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if self.conv.weight.abs().sum() > 0:
            x = x * 2
        return self.conv(x)


def conv_bn_stack() -> nn.Sequential:
    """Four convs, two with batch norms: the fine-tuning tests' small network (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 2, 1),
    )
