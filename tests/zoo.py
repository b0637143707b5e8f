"""Shared machinery of the model-zoo tests: build, sensitize, inflate, compare."""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn

from inflate import InflateError, find_input_layers, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

D = torch.float64
CHAOTIC = 1e-6  # an output tolerance above this means rounding alone scrambles the output


class Untestable(Exception):
    """The original network itself cannot be run as the check needs (not the library's doing)."""


class TooBig(MemoryError):
    """Skipped on purpose: float64 copies of the model would not fit (INFLATE_ZOO_MAX_PARAMS)."""


def sensitize(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Move random-init weights away from values that make a network blind to its input.

    Zero-initialised heads and last norms, tiny layer scales (1e-5/1e-6), small-std
    inits whose signal drowns under the biases, identity batch-norm statistics: any of
    them can hide a wrong stem. Every weight tensor gets a variance-preserving
    ``N(0, 1.5/fan_in)`` init, every 0/1-d parameter a value of order one (scales in
    [0.5, 1.5], shifts of order 0.1). Batch norms are then calibrated on one random
    batch (running statistics = that batch's), so activations stay of order one
    through deep networks instead of exploding, which would amplify rounding beyond
    any honest tolerance.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1.5 / p[0].numel()) ** 0.5)
            elif re.search(r"(weight|gamma|scale|ls\d?|alpha|beta)$", name) and not name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.running_mean is not None]
        if norms:
            saved = [(m, m.momentum) for m in norms]
            for m in norms:
                m.momentum = 1.0
            was_training = model.training
            model.train()
            model(torch.randn((4, *shape), generator=gen, dtype=next(model.parameters()).dtype))
            model.train(was_training)
            for m, momentum in saved:
                m.momentum = momentum
    return model


def amplification(net: nn.Module, layers: list[str], x: torch.Tensor, eps: float = 1e-12) -> float:
    """How much ``net`` amplifies a relative change of its input layers' outputs, measured:
    (relative output change) / eps when those outputs are perturbed by ``eps`` relative noise."""
    gen = torch.Generator().manual_seed(1)

    def nudge(_, __, out):
        return out + out.abs().mean() * eps * torch.randn(out.shape, generator=gen, dtype=out.dtype)

    with torch.no_grad():
        clean = net(x)
        handles = [net.get_submodule(n).register_forward_hook(nudge) for n in layers]
        try:
            noisy = net(x)
        finally:
            for h in handles:
                h.remove()
    return ((noisy - clean).norm() / clean.norm()).item() / eps


def check(model: nn.Module, shape: tuple[int, ...], n: int = 2, seed: int = 0) -> dict[str, float]:
    """Both equivalences (zero rule, scaled repeat) in float64, plus a negative control: one
    input-1 weight off by 1e-3 of the kernel's scale must be detected at the output.

    The widened layers are compared at rtol 1e-10. The output is compared at 1e-10 too, or,
    for a badly conditioned random network, at what a 1e-13 relative discrepancy at those
    layers (100x float64 rounding) becomes at its output, measured by :func:`amplification`;
    past ``CHAOTIC`` the output says nothing and only the layers are judged.
    """
    try:
        net = sensitize(model.to(D), shape, seed).eval()
    except Exception as error:  # noqa: BLE001 - e.g. an aux head that cannot run at this size in train mode
        raise Untestable(f"the original network fails in train mode: {type(error).__name__}") from error
    example = torch.zeros(1, *shape, dtype=D)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn((2, *shape), generator=gen, dtype=D) for _ in range(n)]
    with torch.no_grad():
        before = net(xs[0])
    if not torch.isfinite(before).all():
        raise Untestable("the original network's output is not finite")
    layers = find_input_layers(net, example)
    with torch.no_grad():
        after = net(xs[0])  # discovery must leave the model exactly as it was
    if not torch.equal(before, after):
        raise RuntimeError("find_input_layers changed the model: its output differs afterwards")
    out_tol = max(1e-10, 1e-13 * amplification(net, layers, xs[0]))
    if not math.isfinite(out_tol):
        raise Untestable("the original network's output is not finite once its input layers are nudged")
    if out_tol > CHAOTIC:  # rounding alone scrambles this random network's output: judge at the layers
        out_tol = math.inf
    zero = inflate_first_conv(copy.deepcopy(net), n, init="zero", example_input=example)
    z = assert_zero_inflation_equivalent(net, zero, xs, compare_at=layers, output_rtol=out_tol)
    rep = inflate_first_conv(copy.deepcopy(net), n, init="repeat", example_input=example)
    r = assert_repeat_equivalent(net, rep, xs[0], n, compare_at=layers, output_rtol=out_tol)
    weight = rep.get_submodule(layers[0]).weight
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3 * weight.abs().max()
    try:  # at the output, or at the layers where the output cannot tell
        assert_repeat_equivalent(net, rep, xs[0], n, rtol=1e-10, output_rtol=out_tol,
                                 compare_at=layers if math.isinf(out_tol) else ())
    except AssertionError:
        pass
    else:
        raise AssertionError(f"negative control not detected (layers {layers}, output rtol {out_tol:.1e})")
    return {"zero": z.max_relative_diff, "repeat": r.max_relative_diff, "output_rtol": out_tol}


def outcome(build) -> str:
    """What became of one model, as ``'<kind>: <details>'``.

    Kinds: ``exact``; ``exact at the layers`` (output chaotic, see :func:`check`);
    ``refused`` (a clear InflateError); ``too big`` (skipped on purpose); ``unbuildable``
    (the model cannot be built or run at all); ``untestable`` (the original network fails
    the check's own runs, e.g. non-finite output); and two failures of the library:
    ``WRONG`` (the inflated model is not equivalent or does not run) and ``ERROR``
    (inflation raised something other than InflateError).

    ``build()`` returns ``(model, input shape)`` or raises if the model cannot be built or run.
    """
    try:
        model, shape = build()
    except TooBig as error:
        return f"too big: {error}"
    except Exception as error:  # noqa: BLE001 - models that cannot run are counted, not tested
        return f"unbuildable: {type(error).__name__}"
    try:
        result = check(model, shape)
    except InflateError as error:
        return "refused: " + str(error).splitlines()[-1].strip()[:120]
    except Untestable as error:
        return f"untestable: {error}"
    except AssertionError as error:
        return "WRONG: " + " ".join(str(error).split())[:300]
    except Exception as error:  # noqa: BLE001 - anything else escaped the library or the inflated model
        return f"ERROR: {type(error).__name__}: " + " ".join(str(error).split())[:300]
    return "exact" if math.isfinite(result["output_rtol"]) else "exact at the layers (output chaotic)"
