"""Shared machinery of the model-zoo tests: build, sensitize, inflate, compare."""

from __future__ import annotations

import copy
import gc
import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from inflate import InflateError, find_input_layers, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

D = torch.float64
F32 = torch.float32


@dataclass(frozen=True)
class Precision:
    """The tolerances of :func:`check` in one dtype.

    The widened layers are compared at ``layers``. The output at ``max(layers, rounding * A)``,
    ``A`` the network's measured :func:`amplification` (by a ``nudge`` relative noise); past
    ``chaotic`` rounding alone scrambles the output and only the layers are judged. The negative
    control moves one weight by ``control`` times the kernel's largest.
    """

    layers: float
    rounding: float
    chaotic: float
    nudge: float
    control: float


PRECISIONS = {
    # The layers at default_rtol's 1e-10; the output at 1e-13 (100x float64 rounding) times A.
    D: Precision(layers=1e-10, rounding=1e-13, chaotic=1e-6, nudge=1e-12, control=1e-3),
    # Measured in float32 on the CI sample (22 timm, 12 torchvision models, n=2): the two rules
    # differ at the widened layers by at most 1.2e-6 (10 float32 ulps, the ViT patch embeddings;
    # the zero rule is mostly bit-identical), at the output by at most 3.3x that times max(1, A)
    # (downstream rounding adds to it). 1e-5 (84 ulps) leaves 8x at the layers and >= 6x at the
    # output. A nudge of 1e-4 (~1000x float32 rounding) measures A within 10% of nudges of 1e-3
    # and 1e-5; it is a linear measurement only while the nudged output moves by <= 1e-2, i.e.
    # A <= 100, so an output tolerance past 1e-3 is chaotic (LeViT-128S measures A = 500, 3,900
    # and 26,000 with the three nudges: its float32 output is rounding noise).
    # The control: one weight off by 10% of the kernel's largest moves the widened layer by
    # 2.9e-4 (ViT-B/16's patch embedding) to 1.5e-2 (small stems), >= 29x the layer tolerance,
    # and the output by >= 15x its tolerance; still 10x or more below what a wrong rule does
    # (a whole input's block of the kernel wrong moves the layer by O(0.1-1)).
    F32: Precision(layers=1e-5, rounding=1e-5, chaotic=1e-3, nudge=1e-4, control=1e-1),
}
CHAOTIC = PRECISIONS[D].chaotic  # an output tolerance above this means rounding alone scrambles the output


class Untestable(Exception):
    """The original network itself cannot be run as the check needs (not the library's doing)."""


class TooBig(MemoryError):
    """Skipped on purpose: copies of the model would not fit (INFLATE_ZOO_MAX_PARAMS for
    float64, INFLATE_ZOO_MAX_PARAMS32 for float32)."""


def sensitize(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Move random-init weights away from values that make a network blind to its input.

    Zero-initialised heads and last norms, tiny layer scales (1e-5/1e-6), small-std
    inits whose signal drowns under the biases, identity batch-norm statistics: any of
    them can hide a wrong stem. Every weight tensor gets a variance-preserving
    ``N(0, 1.5/fan_in)`` init, every 0/1-d parameter a value of order one (scales in
    [0.5, 1.5], shifts of order 0.1). Batch norms are then calibrated on one random
    batch (running statistics = that batch's), so activations stay of order one
    through deep networks instead of exploding, which would amplify rounding beyond
    any honest tolerance. The random numbers are drawn on the model's device.
    """
    device = device_of(model)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            draw = {"generator": gen, "dtype": p.dtype, "device": device}
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, **draw) * (1.5 / p[0].numel()) ** 0.5)
            elif re.search(r"(weight|gamma|scale|ls\d?|alpha|beta)$", name) and not name.endswith("bias"):
                p.copy_(torch.rand(p.shape, **draw) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, **draw) * 0.1)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.running_mean is not None]
        if norms:
            saved = [(m, m.momentum) for m in norms]
            for m in norms:
                m.momentum = 1.0
            was_training = model.training
            model.train()
            model(torch.randn((4, *shape), generator=gen, dtype=next(model.parameters()).dtype, device=device))
            model.train(was_training)
            for m, momentum in saved:
                m.momentum = momentum
    return model


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter or buffer lives (the CPU for a model with neither)."""
    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))


def amplification(net: nn.Module, layers: list[str], x: torch.Tensor, eps: float = 1e-12) -> float:
    """How much ``net`` amplifies a relative change of its input layers' outputs, measured:
    (relative output change) / eps when those outputs are perturbed by ``eps`` relative noise."""
    gen = torch.Generator(x.device).manual_seed(1)

    def nudge(_, __, out):
        return out + out.abs().mean() * eps * torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)

    with torch.no_grad():
        clean = net(x)
        handles = [net.get_submodule(n).register_forward_hook(nudge) for n in layers]
        try:
            noisy = net(x)
        finally:
            for h in handles:
                h.remove()
    return ((noisy - clean).norm() / clean.norm()).item() / eps


def check(model: nn.Module, shape: tuple[int, ...], n: int = 2, seed: int = 0,
          dtype: torch.dtype = D) -> dict[str, float]:
    """Both equivalences (zero rule, scaled repeat), plus a negative control: one input-1
    weight off by a fraction of the kernel's scale must be detected at the output.

    In float64 (the default) the widened layers are compared at rtol 1e-10. The output is
    compared at 1e-10 too, or, for a badly conditioned random network, at what a 1e-13
    relative discrepancy at those layers (100x float64 rounding) becomes at its output,
    measured by :func:`amplification`; past ``CHAOTIC`` the output says nothing and only the
    layers are judged. The control weight is off by 1e-3.

    ``dtype=torch.float32`` is for models whose float64 copies do not fit: the layers at
    1e-5, the output at ``1e-5 * max(1, amplification)``, chaotic past 1e-3, the control
    off by 0.1; :data:`PRECISIONS` says why. Only one inflated copy is alive at a time, and it
    shares every tensor outside the input layers with ``net`` (:func:`lean_copy`); the
    original's output is checked unchanged at the end, so an inflation that wrote into a
    shared tensor fails. It runs where ``model`` is (a GPU: float64 for models too big for the CPU).
    """
    p = PRECISIONS[dtype]
    try:
        net = sensitize(model.to(dtype), shape, seed).eval()
    except Exception as error:  # noqa: BLE001 - e.g. an aux head that cannot run at this size in train mode
        raise Untestable(f"the original network fails in train mode: {type(error).__name__}") from error
    device = device_of(net)
    example = torch.zeros(1, *shape, dtype=dtype, device=device)
    gen = torch.Generator(device).manual_seed(seed)
    xs = [torch.randn((2, *shape), generator=gen, dtype=dtype, device=device) for _ in range(n)]
    with torch.no_grad():
        before = net(xs[0])
    if not torch.isfinite(before).all():
        raise Untestable("the original network's output is not finite")
    layers = find_input_layers(net, example)
    with torch.no_grad():
        after = net(xs[0])  # discovery must leave the model exactly as it was
    if not torch.equal(before, after):
        raise RuntimeError("find_input_layers changed the model: its output differs afterwards")
    del after
    amp = amplification(net, layers, xs[0], eps=p.nudge)
    out_tol = max(p.layers, p.rounding * amp)
    if not math.isfinite(out_tol):
        raise Untestable("the original network's output is not finite once its input layers are nudged")
    if out_tol > p.chaotic:  # rounding alone scrambles this random network's output: judge at the layers
        out_tol = math.inf
    zero = inflate_first_conv(lean_copy(net, layers), n, init="zero", example_input=example)
    z = assert_zero_inflation_equivalent(net, zero, xs, compare_at=layers, rtol=p.layers, output_rtol=out_tol)
    del zero  # one inflated copy at a time: a big model's copies are most of the memory
    gc.collect()
    rep = inflate_first_conv(lean_copy(net, layers), n, init="repeat", example_input=example)
    r = assert_repeat_equivalent(net, rep, xs[0], n, compare_at=layers, rtol=p.layers, output_rtol=out_tol)
    weight = rep.get_submodule(layers[0]).weight
    with torch.no_grad():
        weight.view(-1)[0] += p.control * weight.abs().max()
    try:  # at the output, or at the layers where the output cannot tell
        assert_repeat_equivalent(net, rep, xs[0], n, rtol=p.layers, output_rtol=out_tol,
                                 compare_at=layers if math.isinf(out_tol) else ())
    except AssertionError:
        pass
    else:
        raise AssertionError(f"negative control not detected (layers {layers}, output rtol {out_tol:.1e})")
    del rep
    with torch.no_grad():
        if not torch.equal(net(xs[0]), before):
            raise AssertionError("inflating a copy changed the original: a tensor it shares was written")
    return {"zero": z.max_relative_diff, "repeat": r.max_relative_diff, "output_rtol": out_tol,
            "rtol": p.layers, "amplification": amp}


class offloaded(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.device
    """Within it, tensors are made in ``dtype`` by default, and every ``torch.empty`` of at least
    ``min_numel`` elements on the CPU (the weights of ``nn.Linear``, ``nn.Conv2d`` ...) is backed
    by a file in ``folder``, mapped shared: the page cache holds what fits in memory and the disk
    the rest, so a model larger than the machine's memory can be built and checked (slowly).
    The files are unlinked at once; their space is freed with the tensors."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype = F32, min_numel: int = 1 << 20) -> None:
        super().__init__()
        self.folder, self.dtype, self.min_numel, self.count = Path(folder), dtype, min_numel, itertools.count()

    def __enter__(self):
        self.default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_default_dtype(self.default)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and torch.device(kwargs.get("device") or "cpu").type == "cpu":
            size = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else args
            if (numel := math.prod(size)) >= self.min_numel:
                path = self.folder / f"{os.getpid()}-{next(self.count)}"
                dtype = kwargs.get("dtype") or torch.get_default_dtype()
                tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(size)
                path.unlink()  # the mapping keeps the file's pages; they go with the tensor
                return tensor.requires_grad_(bool(kwargs.get("requires_grad")))
        return func(*args, **kwargs)


def meta_count(make) -> int | None:
    """Parameters of the model ``make()`` builds on the meta device (no memory), or None if it
    cannot be built there (some constructors compute on real tensors)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in make().parameters())
    except Exception:  # noqa: BLE001 - unknown: the caller decides
        return None


def lean_copy(net: nn.Module, layers: list[str]) -> nn.Module:
    """A deep copy of ``net`` that shares every parameter and buffer outside the modules
    ``layers`` with it: the memory of one model, not two, for what inflation only reads."""
    own = {id(t) for name in layers for m in [net.get_submodule(name)]
           for t in [*m.parameters(), *m.buffers()]}
    memo = {id(t): t for t in [*net.parameters(), *net.buffers()] if id(t) not in own}
    return copy.deepcopy(net, memo)


def outcome(build) -> str:
    """What became of one model, as ``'<kind>: <details>'``.

    Kinds: ``exact``; ``exact at the layers`` (output chaotic, see :func:`check`);
    ``refused`` (a clear InflateError); ``too big`` (skipped on purpose); ``unbuildable``
    (the model cannot be built or run at all); ``untestable`` (the original network fails
    the check's own runs, e.g. non-finite output); and two failures of the library:
    ``WRONG`` (the inflated model is not equivalent or does not run) and ``ERROR``
    (inflation raised something other than InflateError).

    ``build()`` returns ``(model, input shape)``, or ``(model, input shape, dtype)`` to be
    checked in that dtype, or raises if the model cannot be built or run. A check in float32
    says so in its kind (``exact (float32)``, ``WRONG (float32)`` ...): its tolerances are
    looser, and a sweep's summary counts it apart.
    """
    try:
        model, shape, *dtype = build()
    except TooBig as error:
        return f"too big: {error}"
    except Exception as error:  # noqa: BLE001 - models that cannot run are counted, not tested
        return f"unbuildable: {type(error).__name__}"
    dtype = dtype[0] if dtype else D
    precision = str(dtype).removeprefix("torch.")
    tag = "" if dtype == D else f" ({precision})"
    try:
        result = check(model, shape, dtype=dtype)
    except InflateError as error:
        return "refused: " + str(error).splitlines()[-1].strip()[:120]
    except Untestable as error:
        return f"untestable{tag}: {error}"
    except AssertionError as error:
        return f"WRONG{tag}: " + " ".join(str(error).split())[:300]
    except Exception as error:  # noqa: BLE001 - anything else escaped the library or the inflated model
        return f"ERROR{tag}: {type(error).__name__}: " + " ".join(str(error).split())[:300]
    finally:
        del model  # the sweep's next model should not share memory with this one
        gc.collect()
    if math.isfinite(result["output_rtol"]):
        return f"exact{tag}"
    return "exact at the layers (" + (f"{precision}, " if tag else "") + "output chaotic)"
