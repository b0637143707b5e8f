"""Compute the frozen part of a network once; train only the trainable tail on cached features.

The model is traced with :mod:`torch.fx`; every graph node that depends on a
trainable parameter belongs to the *tail*, every other node to the frozen
*prefix*. The frozen values the tail reads are the features to cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import InflateError
from ._tracer import unwrap

__all__ = ["FrozenSplit", "split_frozen"]

_STOCHASTIC_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                       nn.FeatureAlphaDropout, nn.RReLU)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_STOCHASTIC_FUNCTIONS = {*_DROPOUT_FUNCTIONS, torch.rand, torch.randn, torch.rand_like, torch.randn_like,
                         torch.randint, torch.randint_like, torch.randperm, torch.bernoulli, torch.multinomial,
                         torch.normal, torch.poisson, F.gumbel_softmax}
#: Tensor methods that draw random numbers, as torch.fx records them (``call_method`` nodes): the
#: in-place samplers, which fill a tensor from a distribution, and the out-of-place ones.
_STOCHASTIC_METHODS = {"normal_", "bernoulli_", "uniform_", "exponential_", "random_", "geometric_", "cauchy_",
                       "log_normal_", "bernoulli", "multinomial"}


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    try:
        from timm.layers import _fx
    except ImportError:
        return (), ()
    return tuple(_fx.get_notrace_modules()), tuple(_fx.get_notrace_functions())


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...], autowrap: tuple[Any, ...]) -> None:
        super().__init__(autowrap_functions=autowrap)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _trainable(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(p.requires_grad for p in root.get_submodule(str(node.target)).parameters())
    if node.op == "get_attr":
        value = root
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return isinstance(value, Tensor) and value.requires_grad
    return False


def _argument(node: fx.Node, position: int, name: str, default: Any) -> Any:
    """The argument ``name`` of a call node, given by keyword or at ``position``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


def _nondeterminism(root: nn.Module, node: fx.Node) -> str | None:
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        for name, sub in [("", module), *module.named_modules()]:
            where = f"'{node.target}{'.' + name if name else ''}' ({type(sub).__name__})"
            if sub.training and isinstance(sub, nn.modules.batchnorm._BatchNorm):
                return f"{where} is a batch norm in train mode; pin it with pin_batchnorm(model, 'eval')"
            rate = getattr(sub, "p", getattr(sub, "drop_prob", None))
            random = isinstance(sub, _STOCHASTIC_MODULES) or "droppath" in type(sub).__name__.lower()
            if sub.training and random and rate != 0:
                return f"{where} is random in train mode; call .eval() on it"
    if node.op == "call_function" and node.target in _STOCHASTIC_FUNCTIONS:
        if node.target in _DROPOUT_FUNCTIONS and _argument(node, 2, "training", True) is False:
            return None
        return f"{node.name} calls {getattr(node.target, '__name__', node.target)}, which is random"
    if node.op == "call_function" and node.target is F.rrelu and _argument(node, 3, "training", False) is not False:
        return f"{node.name} calls rrelu with training=True, which is random"
    if node.op == "call_method" and node.target in _STOCHASTIC_METHODS:
        return f"{node.name} calls Tensor.{node.target}, which is random"
    return None


@dataclass
class FrozenSplit:
    """The frozen prefix and trainable tail of a model (see :func:`split_frozen`).

    Attributes:
        prefix: maps the model input to the tuple of cached features.
        tail: maps those features to the model output; holds the trainable parameters.
        features: graph names of the cached values (tensors, and sizes the tail reads).
    """

    prefix: fx.GraphModule
    tail: fx.GraphModule
    features: list[str]

    @torch.no_grad()
    def precompute(self, inputs: Iterable[Tensor]) -> list[tuple[Tensor, ...]]:
        """Run the frozen prefix once over ``inputs``; the result can be fed to :attr:`tail` forever."""
        return [tuple(t.detach() if isinstance(t, Tensor) else t for t in self.prefix(x)) for x in inputs]


def split_frozen(model: nn.Module) -> FrozenSplit:
    """Split ``model`` into a frozen prefix, computed once, and the trainable tail.

    Which parameters are trainable comes from ``requires_grad`` (set it with
    :func:`inflate.finetune`). The prefix must be deterministic: batch norms in
    it must be in eval mode (:func:`inflate.finetune` pins the frozen ones, or
    :func:`inflate.pin_batchnorm`) and dropout or other randomness must be off: dropout,
    drop-path and ``RReLU`` modules in train mode, random functions (``torch.rand``,
    ``torch.normal``, ``torch.bernoulli`` ...) and the tensor methods that sample
    (``normal_``, ``uniform_``, ``bernoulli_``, ``random_`` ...) are refused. The split shares parameters with
    ``model``: training the tail trains the model.

    Args:
        model: the network (wrappers are looked through).

    Returns:
        A :class:`FrozenSplit`; ``split.tail(*split.prefix(x))`` equals ``model(x)``.

    Raises:
        InflateError: the model cannot be traced by torch.fx, has no trainable
            parameter, or its frozen part is not deterministic.

    Example:
        >>> import torch, torch.nn as nn
        >>> from inflate import finetune
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
        >>> _ = finetune(net, "last")
        >>> split = split_frozen(net)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.equal(split.tail(*split.prefix(x)), net(x))
        True
    """
    root = unwrap(model)
    leaves, autowrap = _timm_notrace()
    concrete: dict[str, Any] = {}
    try:
        params = list(inspect.signature(root.forward).parameters.values())[1:]
        concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        graph = _Tracer(leaves, autowrap).trace(root, concrete_args=concrete or None)
    except Exception as error:  # noqa: BLE001 - fx raises many kinds
        raise InflateError(f"the graph cannot be split: torch.fx could not trace {type(root).__name__} "
                           f"({type(error).__name__}: {error})") from error
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) - len(concrete) != 1:  # arguments with defaults were fixed to them
        raise InflateError(f"the graph cannot be split: expected a forward with one required input, got "
                           f"{[str(n.target) for n in inputs]}")
    tail: set[fx.Node] = set()
    for node in graph.nodes:
        if _trainable(root, node) or any(a in tail for a in node.all_input_nodes):
            tail.add(node)
    output = next(n for n in graph.nodes if n.op == "output")
    if not tail - {output}:
        raise InflateError("expected at least one trainable parameter (requires_grad) on the path to the output, "
                           "found none")
    frozen = [n for n in graph.nodes if n not in tail and n.op != "placeholder"]
    for node in frozen:
        problem = _nondeterminism(root, node)
        if problem:
            raise InflateError(f"the frozen part is not deterministic, so its features cannot be cached: {problem}")
    boundary = [n for n in graph.nodes if n not in tail and any(u in tail for u in n.users)]
    return FrozenSplit(_prefix(root, graph, boundary), _tail(root, graph, tail, boundary),
                       [n.name for n in boundary])


def _prefix(root: nn.Module, graph: fx.Graph, boundary: Sequence[fx.Node]) -> fx.GraphModule:
    needed: set[fx.Node] = set()
    stack = list(boundary)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in needed:
            env[node] = new.node_copy(node, lambda n: env[n])
    new.output(tuple(env[n] for n in boundary))
    return fx.GraphModule(root, new, class_name="FrozenPrefix")


def _tail(root: nn.Module, graph: fx.Graph, tail: set[fx.Node], boundary: Sequence[fx.Node]) -> fx.GraphModule:
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: new.placeholder(n.name) for n in boundary}
    for node in graph.nodes:
        if node in tail:
            env[node] = new.node_copy(node, lambda n: env[n])
    return fx.GraphModule(root, new, class_name="TrainableTail")
