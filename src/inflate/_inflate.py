"""The front door: ``inflate_first_conv``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import _rewrites as rewriting
from . import _surgery as surgery
from ._call import Example, as_call
from ._discovery import Discovery, InputLayer, discover
from ._errors import InflateError, TraceError
from ._configs import config_attrs, update_configs
from ._tracer import Plan, unwrap
from ._verify import verify
from .rules import RULES, Init, KernelLayout

__all__ = ["inflate_first_conv"]


def _validate(num_inputs: object, init: object, scale: object, channels: object, input_layers: object,
              example_input: object, input_arg: object) -> None:
    if not isinstance(num_inputs, int) or isinstance(num_inputs, bool) or num_inputs < 1:
        raise InflateError(f"num_inputs: expected an int >= 1, got {num_inputs!r}")
    if not callable(init) and init not in RULES:
        raise InflateError(f"init: expected one of {RULES} or a callable, got {init!r}")
    if not isinstance(scale, bool):
        raise InflateError(f"scale: expected a bool, got {scale!r}")
    if channels is not None:
        ok = isinstance(channels, Sequence) and all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels)
        if not ok:
            raise InflateError(f"channels: expected a sequence of ints >= 1, got {channels!r}")
        if len(channels) != num_inputs:  # type: ignore[arg-type]
            raise InflateError(f"channels: expected {num_inputs} counts (one per input), "
                               f"got {len(channels)}: {tuple(channels)}")  # type: ignore[arg-type]
    if input_layers is not None and (isinstance(input_layers, str) or not isinstance(input_layers, Sequence)
                                     or not input_layers or not all(isinstance(n, str) for n in input_layers)):
        raise InflateError(f"input_layers: expected a non-empty sequence of layer names, got {input_layers!r}")
    if example_input is not None:
        as_call(example_input, input_arg)


def _declared_layers(model: nn.Module, names: Sequence[str]) -> list[InputLayer]:
    """Plain kernel layouts for layers named by the user when the model cannot be traced."""
    layers = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise InflateError(f"input_layers: expected names of submodules, got {name!r}") from error
        if isinstance(module, nn.modules.conv._ConvNd):
            kind = "transposed" if module.transposed else "conv"
            layers.append(InputLayer(name, "weight", KernelLayout(kind, module.groups), module.in_channels))
        elif isinstance(module, nn.Linear):
            layers.append(InputLayer(name, "weight", KernelLayout("linear"), module.in_features))
        else:
            raise InflateError(f"input_layers: expected Conv or Linear modules, got {type(module).__name__} "
                               f"for {name!r}")
    if len({layer.channels for layer in layers}) > 1:
        raise InflateError("input_layers: expected layers that read the same input, got different channel counts "
                           + str({layer.name: layer.channels for layer in layers}))
    return layers


def _input_layers(model: nn.Module, names: Sequence[str] | None,
                  example_input: Example | None, input_arg: int | str | None) -> tuple[list[InputLayer],
                                                                                       Discovery | None]:
    """The layers to widen, and the discovery that found them (None: named by the user)."""
    try:
        found = discover(model, example_input, input_arg)
    except TraceError:
        if names is None:
            raise
        return _declared_layers(model, names), None  # the model cannot be traced: the user names the layers
    found.raise_problems()
    if names is not None:
        got = [layer.name for layer in found.layers]
        if sorted(got) != sorted(names):
            raise InflateError(f"input_layers: expected exactly the layers that read the input, {got}, "
                               f"got {list(names)}")
    return found.layers, found


def inflate_first_conv(
    model: nn.Module,
    num_inputs: int = 2,
    *,
    init: Init = "repeat",
    scale: bool = True,
    channels: Sequence[int] | None = None,
    input_layers: Sequence[str] | None = None,
    example_input: Example | None = None,
    input_arg: int | str | None = None,
) -> nn.Module:
    """Widen the layer(s) that read the input so the model takes ``num_inputs`` inputs.

    Inputs are concatenated along the channel axis: the model then takes
    ``(B, N*C, ...)`` with input ``i`` (counting from 0) at channels ``[i*C, (i+1)*C)``, which is
    ``einops.rearrange(x, "b n c ... -> b (n c) ...")`` of a ``(B, N, C, ...)`` stack.
    The layers are found by following the data (:func:`find_input_layers`), so every
    branch of a multi-branch stem is widened.

    Rules (``init``), on each input-layer kernel ``W``:

    * ``"repeat"``: every input gets ``W``; with ``scale=True`` divided by ``N``, so
      ``N`` identical inputs give exactly the original output. ``scale=False`` is
      the plain ``W.repeat(1, N, 1, 1)``.
    * ``"zero"``: the first input keeps ``W``, the others get zeros: the output equals
      the original model's on the first input, whatever the others hold (finite values).
    * ``"average"``: every channel gets the channel mean of ``W`` rescaled so that a
      constant input gives the original response (divided by ``N`` with ``scale``).
    * a callable ``fn(kernel, i, channels_i)`` returning the block of input ``i``,
      where ``kernel`` is ``(out, C, outer, inner, *k)`` (see :mod:`inflate.rules`).

    Bias, dtype, device, ``requires_grad``, memory format, stride, padding,
    dilation and padding mode are kept; grouped or depthwise input convs become the
    equivalent dense conv (``groups=1``). A timm ``pretrained_cfg`` gets the new
    ``in_chans``/``input_size`` and per-input ``mean``/``std``. Build optimizers
    after inflating: the inflated layers hold new ``Parameter`` objects.

    Args:
        model: the network; ``DataParallel``/DDP/``torch.compile`` wrappers are looked
            through (the wrapper is returned).
        num_inputs: ``N``, the number of inputs.
        init: ``"repeat"``, ``"zero"``, ``"average"`` or a callable.
        scale: divide by ``N`` for ``"repeat"`` and ``"average"``.
        channels: channel count of each input, e.g. ``(3, 2, 1)`` for RGB + flow +
            depth; default ``C`` for each. Inputs with another count than ``C`` get
            the ``"average"`` rule (under ``"zero"``, only the first input is non-zero).
        input_layers: the names you expect to be widened. If the model can be traced
            they must equal the discovered ones (a check); if it cannot
            (:class:`~inflate.TraceError`), these layers are widened as plain
            conv/linear layers, unverified: exactness is then your responsibility.
        example_input: what the model is called with: a tensor ``(B, C, ...)``, a tuple
            of positional arguments or a dict of keyword arguments (as
            :func:`torch.export.export` takes them). Shapes and dtypes are used on the
            meta device; values only if the model cannot run on meta (then it runs once
            for real, followed the same way).
        input_arg: which argument of ``example_input`` is the input to inflate, by
            position or keyword; default the first tensor argument.

    Returns:
        ``model`` itself, changed in place.

    Before anything changes, the model runs once more with the new weights standing in,
    on a meta ``(B, N*C, ...)`` input (on the real example, repeated per input, where
    discovery had to run for real), and every operation is compared with the original
    run: same operations, same non-tensor arguments, shapes as expected. An inflated
    model that would not read its new input, or whose computation depends on the
    channel count (``x / x.shape[1]``), is refused.

    Raises:
        InflateError: invalid arguments. Its subclasses: :class:`~inflate.TraceError`,
            the model could not run on the example input; :class:`~inflate.InexactError`,
            a layer cannot be widened exactly (weight norm, a weight-standardized conv of
            a class inflate does not know, channel-specific input transforms, input values
            read into Python, a computation that depends on the channel count) or the inflated model would not run. The model is
            then unchanged.

    Example:
        >>> import torch, torch.nn as nn
        >>> from inflate import inflate_first_conv
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> x1, x2 = torch.randn(2, 1, 3, 16, 16)
        >>> before = net(x1)
        >>> inflate_first_conv(net, 2, init="zero")[0]
        Conv2d(6, 8, kernel_size=(3, 3), stride=(1, 1))
        >>> torch.allclose(net(torch.cat([x1, x2], dim=1)), before, atol=1e-6)
        True
    """
    _validate(num_inputs, init, scale, channels, input_layers, example_input, input_arg)
    target = unwrap(model)
    rewrites = rewriting.find(target)  # forwards that index channels in code, in an equal form
    with rewriting.rewritten(rewrites):
        layers, found = _input_layers(target, input_layers, example_input, input_arg)
        c = layers[0].input_channels
        counts = tuple(channels) if channels is not None else (c,) * num_inputs
        changes = surgery.plan(target, layers, counts, init, scale)
        if found is not None:
            changes += [surgery.plan_operand(target, operand, counts) for operand in found.operands]
        weights = {id(getattr(ch.module, ch.attr)): ch.weight for ch in changes
                   if isinstance(ch.weight, torch.Tensor)}
        attrs: dict[int, dict[str, Any]] = {}
        for ch in changes:
            extra = {**ch.attrs, **ch.stand_in} if isinstance(ch.weight, torch.Tensor) else \
                {**ch.attrs, ch.attr: ch.weight}
            attrs[id(ch.module)] = {**attrs.get(id(ch.module), {}), **extra}
        for key, extra in config_attrs(target, counts, weights).items():  # attributes that gate the forward
            attrs[key] = {**attrs.get(key, {}), **extra}
        if found is not None:
            verify(target, found, Plan(weights, attrs), counts)
    if found is not None:  # traced and checked in the rewritten form: the form it keeps
        stems = {layer.name.rpartition(".")[0] for layer in layers if layer.unit is not None}
        readers = {id(target.get_submodule(name)) for name in stems}
        rewriting.commit([r for r in rewrites if not r.reads or id(r.module) in readers])
    surgery.apply(changes)
    update_configs(target, counts)
    return model
