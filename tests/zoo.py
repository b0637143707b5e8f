"""Shared machinery of the model-zoo tests: build, sensitize, inflate, compare."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from inflate import InflateError, find_input_layers, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

D = torch.float64


def sensitize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move random-init weights away from values that make a network blind to its input.

    Zero-initialised heads and last norms, tiny layer scales (1e-5/1e-6), small-std
    inits whose signal drowns under the biases, identity batch-norm statistics: any of
    them can hide a wrong stem. Every weight tensor gets a variance-preserving
    ``N(0, 1.5/fan_in)`` init, every 0/1-d parameter and BN statistic a value of order
    one (scales in [0.5, 1.5], shifts of order 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1.5 / p[0].numel()) ** 0.5)
            elif p.ndim <= 1:
                if re.search(r"(weight|gamma|scale|ls\d?|alpha|beta)$", name) and not name.endswith("bias"):
                    p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen, dtype=D) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen, dtype=D) + 0.5)
    return model


def check(model: nn.Module, shape: tuple[int, ...], n: int = 2, seed: int = 0) -> dict[str, float]:
    """Both equivalences (zero rule, scaled repeat) in float64, at the stem and output, plus
    a negative control: one input-1 weight off by 1e-3 of the kernel's scale must be detected."""
    net = sensitize(model.to(D).eval(), seed)
    example = torch.zeros(1, *shape, dtype=D)
    layers = find_input_layers(net, example)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn((2, *shape), generator=gen, dtype=D) for _ in range(n)]
    zero = inflate_first_conv(copy.deepcopy(net), n, init="zero", example_input=example)
    z = assert_zero_inflation_equivalent(net, zero, xs, layers=layers)
    rep = inflate_first_conv(copy.deepcopy(net), n, init="repeat", example_input=example)
    r = assert_repeat_equivalent(net, rep, xs[0], n, layers=layers)
    weight = rep.get_submodule(layers[0]).weight
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3 * weight.abs().max()
    try:
        assert_repeat_equivalent(net, rep, xs[0], n)
    except AssertionError:
        pass
    else:
        raise AssertionError(f"negative control not detected at the output (layers {layers})")
    return {"zero": z.max_relative_diff, "repeat": r.max_relative_diff}


def outcome(build, shape: tuple[int, ...]) -> str:
    """'exact', 'refused: ...', 'unbuildable: ...' or 'WRONG: ...' (a silently wrong inflation)."""
    try:
        model = build()
        with torch.no_grad():
            model.to(D).eval()(torch.zeros(1, *shape, dtype=D))
    except Exception as error:  # noqa: BLE001 - models that cannot run at this size are counted, not tested
        return f"unbuildable: {type(error).__name__}"
    try:
        check(model, shape)
    except InflateError as error:
        return "refused: " + str(error).splitlines()[-1].strip()[:120]
    except AssertionError as error:
        return "WRONG: " + " ".join(str(error).split())[:300]
    return "exact"
