"""Hypothesis strategies: random small conv networks and matching input batches.

Architectures are drawn by Hypothesis (so failures shrink to simpler networks)
and weights come from a ``torch.Generator`` seeded by Hypothesis (so they replay).
Torch's global RNG is registered with Hypothesis, which seeds and restores it
around every example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hypothesis
import torch
from hypothesis import strategies as st
from torch import Tensor, nn

__all__ = ["SmallConvNet", "conv_nets", "input_batches"]


class _TorchRandom:
    """Adapter so Hypothesis can seed, save and restore torch's global RNG."""

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def getstate(self) -> Tensor:
        return torch.get_rng_state()

    def setstate(self, state: Tensor) -> None:
        torch.set_rng_state(state)


_TORCH_RANDOM = _TorchRandom()
hypothesis.register_random(_TORCH_RANDOM)  # type: ignore[arg-type]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


class _Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, the statistics in buffers: a normaliser inside the model."""

    def __init__(self, channels: int, dims: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.shape = (1, -1) + (1,) * dims

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.view(self.shape)) / self.std.view(self.shape)


class SmallConvNet(nn.Module):
    """A small conv network with a (possibly multi-branch) stem whose branches are summed.

    Attributes:
        in_channels: ``C`` of the input.
        input_shape: ``(C, *spatial)`` of one input sample.
        description: how it was built, for readable failure reports.
    """

    def __init__(self, pre: nn.Module, stem: Sequence[nn.Module], body: nn.Module, input_shape: tuple[int, ...],
                 description: str) -> None:
        super().__init__()
        self.pre = pre
        self.stem = nn.ModuleList(stem)
        self.body = body
        self.in_channels = input_shape[0]
        self.input_shape = input_shape
        self.description = description

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        y = self.stem[0](x)
        for branch in self.stem[1:]:
            y = y + branch(x)
        return self.body(y)

    def extra_repr(self) -> str:
        return self.description


def _randomize(model: nn.Module, seed: int) -> None:
    """Weights, biases and batch-norm statistics from a seeded generator (BN well away from identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen))
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen))
            elif isinstance(module, _Normalize):
                module.mean.copy_(torch.randn(module.mean.shape, generator=gen))
                module.std.copy_(torch.rand(module.std.shape, generator=gen) + 0.5)
            elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen))


@st.composite
def _conv_net(draw: Any, dims: Sequence[int], transposed: bool, grouped: bool, bias: bool | None,
              batch_norm: bool, residual: bool, multi_branch: bool, input_affine: bool,
              dtype: torch.dtype) -> SmallConvNet:
    d = draw(st.sampled_from(list(dims)))
    c = draw(st.integers(1, 4))
    size = draw(st.integers(5, 9 if d < 3 else 6))
    width = draw(st.integers(1, 3)) * c if grouped else draw(st.integers(1, 6))
    has_bias = draw(st.booleans()) if bias is None else bias
    kinds = ["plain"] + (["transposed"] if transposed else []) + (["grouped"] if grouped and c > 1 else []) + (
        ["branches"] if multi_branch else [])
    kind = draw(st.sampled_from(kinds))
    k = draw(st.integers(1, 3))
    notes = [f"{d}d C={c} size={size} stem={kind} k={k} width={width} bias={has_bias}"]
    affines = (["normalize"] + (["batch_norm"] if batch_norm else [])) if input_affine else []
    pre_kind = draw(st.sampled_from(["none", "scale", "pool", "pad", *affines]))
    pre: nn.Module = {
        "none": nn.Identity,
        "scale": lambda: nn.Hardtanh(-2.0, 2.0),
        "pool": lambda: _POOL[d](2, stride=1),
        "pad": lambda: nn.ReplicationPad1d(1) if d == 1 else (nn.ReplicationPad2d(1) if d == 2 else
                                                                nn.ReplicationPad3d(1)),
        "normalize": lambda: _Normalize(c, d),  # per-channel affines: widened per input
        "batch_norm": lambda: _BN[d](c),
    }[pre_kind]()
    notes.append(f"pre={pre_kind}")
    if kind == "transposed":
        stem = [_CONV_T[d](c, width, k, stride=draw(st.integers(1, 2)), bias=has_bias)]
    elif kind == "grouped":
        groups = draw(st.sampled_from([g for g in range(2, c + 1) if c % g == 0 and width % g == 0] or [1]))
        stem = [_CONV[d](c, width, k, padding=k // 2, groups=groups, bias=has_bias)]
        notes.append(f"groups={groups}")
    elif kind == "branches":
        n = draw(st.integers(2, 3))
        stem = [_CONV[d](c, width, kb, padding=kb // 2, bias=has_bias) for kb in (1, 3, 5)[:n]]
    else:
        mode = draw(st.sampled_from(["zeros", "circular", "replicate"]))
        stem = [_CONV[d](c, width, k, stride=draw(st.integers(1, 2)), padding=k // 2, padding_mode=mode,
                         dilation=draw(st.integers(1, 2)) if k > 1 else 1, bias=has_bias)]
        notes.append(f"padding_mode={mode}")
    layers: list[nn.Module] = []
    if batch_norm and draw(st.booleans()):
        layers.append(_BN[d](width))
    layers.append(nn.ReLU())
    if residual and draw(st.booleans()):
        layers.append(_Residual(nn.Sequential(_CONV[d](width, width, 3, padding=1), nn.Tanh())))
        notes.append("residual")
    layers.append(_CONV[d](width, 2, 1))
    model = SmallConvNet(pre, stem, nn.Sequential(*layers), (c, *([size] * d)), " ".join(notes))
    _randomize(model, draw(st.integers(0, 2**31 - 1)))
    return model.to(dtype).eval()


def conv_nets(
    *,
    dims: Sequence[int] = (1, 2, 3),
    transposed: bool = True,
    grouped: bool = True,
    bias: bool | None = None,
    batch_norm: bool = True,
    residual: bool = True,
    multi_branch: bool = True,
    input_affine: bool = True,
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[SmallConvNet]:
    """Random small conv networks in ``eval`` mode, as :class:`SmallConvNet`.

    Stems: plain (stride, dilation, zeros/circular/replicate padding), transposed,
    grouped/depthwise, or 2-3 parallel branches summed (RepVGG-style); optionally
    after a channel-wise op (clamp, pooling, padding) or a per-channel affine on the
    raw input (a mean/std normaliser in buffers, a batch norm), which inflation widens
    per input. Bodies: batch norm with random statistics, ReLU, a residual block, a 1x1
    head.

    Args:
        dims: spatial dimensionalities to draw from (1, 2, 3).
        transposed: allow transposed-conv stems.
        grouped: allow grouped/depthwise stems.
        bias: force the stem bias on/off; ``None`` draws it.
        batch_norm: allow batch norm (in eval mode, random statistics).
        residual: allow a residual block.
        multi_branch: allow multi-branch stems.
        input_affine: allow a per-channel affine on the raw input (normaliser, batch norm).
        dtype: parameter dtype (float64 for exactness claims).

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None)
        ... @given(conv_nets(dims=(2,)))
        ... def test(net):
        ...     assert net(torch.randn(1, *net.input_shape, dtype=torch.float64)).ndim == 4
        >>> test()
    """
    return _conv_net(tuple(dims), transposed, grouped, bias, batch_norm, residual, multi_branch, input_affine, dtype)


@st.composite
def _batches(draw: Any, shape: tuple[int, ...], num_inputs: int, batch_size: Any, dtype: torch.dtype) -> list[Tensor]:
    b = draw(batch_size)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return [torch.randn((b, *shape), generator=gen, dtype=dtype) for _ in range(num_inputs)]


def input_batches(
    input_shape: Sequence[int],
    *,
    num_inputs: int = 1,
    batch_size: st.SearchStrategy[int] | None = None,
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[list[Tensor]]:
    """Lists of ``num_inputs`` random batches ``(B, *input_shape)``, one per input.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=2)
        ... @given(input_batches((3, 4, 4), num_inputs=2))
        ... def test(xs):
        ...     assert len(xs) == 2 and xs[0].shape[1:] == (3, 4, 4)
        >>> test()
    """
    return _batches(tuple(input_shape), num_inputs, batch_size or st.integers(1, 3), dtype)
