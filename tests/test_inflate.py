"""inflate_first_conv: the guarantees, the argument checks, atomicity and what is kept."""

import copy

import pytest
import torch
from torch import nn

from inflate import InflateError, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

from . import models

D = torch.float64


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(
        now[k].dtype == state[k].dtype and now[k].shape == state[k].shape and torch.equal(now[k], state[k])
        for k in state
    )


CASES = [
    ("branches", lambda: models.Branches(), (3, 12, 12)),
    ("patch-linear (p1 p2 c)", lambda: models.PatchLinear(), (3, 16, 16)),
    ("patch-linear (c p1 p2)", lambda: models.PatchLinear(pattern="b c (h p1) (w p2) -> b (h w) (c p1 p2)"),
     (3, 16, 16)),
    ("space-to-depth view", lambda: models.SpaceToDepth(), (3, 12, 12)),
    ("space-to-depth unshuffle", lambda: models.SpaceToDepth(unshuffle=True), (3, 12, 12)),
    ("conv1d", lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=2, dilation=2), nn.Tanh()), (2, 11)),
    ("conv3d", lambda: nn.Sequential(nn.Conv3d(1, 3, 2, stride=2), nn.ReLU()), (1, 6, 6, 6)),
    ("transposed grouped", lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)), (4, 5, 5)),
    ("depthwise", lambda: nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.ReLU(), nn.Conv2d(6, 2, 1)), (3, 7, 7)),
    ("reflect padding", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), (3, 6, 6)),
]


def _eval(factory):
    torch.manual_seed(0)
    net = factory().to(D).eval()
    with torch.no_grad():  # keep random-init layers far from trivial
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def _first_weight(model):
    return next(p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim >= 2)


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("n", [2, 3])
def test_zero_rule_ignores_other_inputs(name, factory, shape, n):
    net = _eval(factory)
    wide = inflate_first_conv(copy.deepcopy(net), n, init="zero", example_input=torch.zeros(1, *shape, dtype=D))
    xs = list(torch.randn(n, 2, *shape, dtype=D))
    assert_zero_inflation_equivalent(net, wide, xs)
    with torch.no_grad():  # negative control: the zero weights (which read inputs 2..N) become non-zero
        w = _first_weight(wide)
        w[w == 0] += 1e-3
    with pytest.raises(AssertionError, match="relative L2 difference"):
        assert_zero_inflation_equivalent(net, wide, xs)


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("n", [2, 3])
def test_scaled_repeat_reproduces_the_original_on_identical_inputs(name, factory, shape, n):
    net = _eval(factory)
    wide = inflate_first_conv(copy.deepcopy(net), n, init="repeat", example_input=torch.zeros(1, *shape, dtype=D))
    x = torch.randn(2, *shape, dtype=D)
    assert_repeat_equivalent(net, wide, x, n)
    with torch.no_grad():  # negative control: one weight element off by 1e-4 of the kernel's largest
        w = _first_weight(wide)
        w.view(-1)[0] += 1e-4 * w.abs().max()
    with pytest.raises(AssertionError):
        assert_repeat_equivalent(net, wide, x, n)


def test_scale_false_is_the_original_studys_weight_repeat():
    net = nn.Conv2d(3, 8, 3)
    w = net.weight.detach().clone()
    inflate_first_conv(net, 2, scale=False)
    assert torch.equal(net.weight, w.repeat(1, 2, 1, 1))


def test_average_rule_keeps_the_response_to_constant_inputs():
    net = nn.Conv2d(3, 5, 3, padding=1).to(D)
    wide = inflate_first_conv(copy.deepcopy(net), 3, init="average", channels=(3, 1, 2))
    k = 0.7
    ones = torch.full((1, 3, 6, 6), k, dtype=D)
    torch.testing.assert_close(wide(torch.full((1, 6, 6, 6), k, dtype=D)), net(ones), rtol=1e-12, atol=1e-12)


def test_heterogeneous_channels_zero_rule():
    net = _eval(lambda: models.Branches())
    wide = inflate_first_conv(copy.deepcopy(net), 3, init="zero", channels=(3, 2, 1))
    assert [wide.k3.in_channels, wide.k1.in_channels, wide.pool_conv.in_channels] == [6, 6, 6]
    xs = [torch.randn(2, c, 10, 10, dtype=D) for c in (3, 2, 1)]
    assert_zero_inflation_equivalent(net, wide, xs, compare_at=["k3", "k1", "pool_conv"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inputs": 0}, r"num_inputs: expected an int >= 1, got 0"),
        ({"num_inputs": True}, r"num_inputs: expected an int >= 1, got True"),
        ({"init": "copy"}, r"init: expected one of \('repeat', 'zero', 'average'\) or a callable, got 'copy'"),
        ({"scale": 1}, r"scale: expected a bool, got 1"),
        ({"channels": (3,)}, r"channels: expected 2 counts \(one per input\), got 1: \(3,\)"),
        ({"channels": (3, 0)}, r"channels: expected a sequence of ints >= 1"),
        ({"input_layers": "k3"}, r"input_layers: expected a non-empty sequence of layer names, got 'k3'"),
        ({"input_layers": ["k3"]}, r"input_layers: expected exactly the layers that read the input, \['k3', 'k1', 'pool_conv'\]"),
        ({"example_input": [1, 2]}, r"example_input: expected a Tensor, a tuple of positional arguments or a dict of keyword arguments, got list"),
    ],
)
def test_invalid_arguments_are_refused_at_the_door_and_change_nothing(kwargs, message):
    net = models.Branches()
    state = _state(net)
    with pytest.raises(InflateError, match=message):
        inflate_first_conv(net, **{"num_inputs": 2, **kwargs})
    assert _same_state(net, state)


def test_atomic_when_the_second_layer_fails():
    net = models.Branches()
    state, params = _state(net), list(net.parameters())
    calls = []

    def rule(kernel, i, c):
        calls.append(i)
        if len(calls) > 2:  # first layer done, fail on the second
            raise InflateError("boom in rule")
        return kernel

    with pytest.raises(InflateError, match="boom in rule"):
        inflate_first_conv(net, 2, init=rule)
    assert _same_state(net, state) and list(net.parameters()) == params
    assert net.k3.in_channels == 3


@pytest.mark.parametrize("model", [models.Normalized(), nn.Sequential(models.StdConv(3, 4, 3))])
def test_refused_models_are_unchanged(model):
    state = _state(model)
    with pytest.raises(InflateError):
        inflate_first_conv(model, 2)
    assert _same_state(model, state)


def test_bias_dtype_requires_grad_and_memory_format_are_kept():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2, padding_mode="circular"))
    net = net.to(torch.float16).to(memory_format=torch.channels_last)
    conv = net[0]
    conv.weight.requires_grad_(False)
    bias = conv.bias
    inflate_first_conv(net, 2, example_input=torch.zeros(1, 3, 8, 8, dtype=torch.float16))
    assert conv.bias is bias
    assert conv.weight.dtype == torch.float16 and not conv.weight.requires_grad
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert (conv.stride, conv.padding, conv.dilation, conv.padding_mode) == ((2, 2), (1, 1), (2, 2), "circular")
    assert isinstance(conv.weight, nn.Parameter) and conv.in_channels == 6


def test_grouped_stems_become_dense_and_stay_exact():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)).to(D)
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="zero")
    assert (wide[0].groups, wide[0].in_channels, tuple(wide[0].weight.shape)) == (1, 8, (8, 8, 3, 3))
    assert_zero_inflation_equivalent(net, wide, list(torch.randn(2, 1, 4, 6, 6, dtype=D)), compare_at=["0"])


def test_meta_device_models_inflate_without_memory():
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 64, 7), nn.ReLU())
    inflate_first_conv(net, 10)
    assert net[0].weight.is_meta and net[0].weight.shape == (64, 30, 7, 7)


def test_wrappers_are_inflated_and_returned():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    dp = nn.DataParallel(net)
    assert inflate_first_conv(dp, 2) is dp and net[0].in_channels == 6
    compiled = torch.compile(nn.Sequential(nn.Conv2d(3, 4, 3)), backend="eager")
    assert inflate_first_conv(compiled, 2) is compiled
    assert compiled(torch.zeros(1, 6, 5, 5)).shape == (1, 4, 3, 3)


def test_named_layers_when_the_model_cannot_be_traced():
    net = models.DataDependent()
    with pytest.raises(InflateError, match="pass example_input"):
        inflate_first_conv(net, 2)
    inflate_first_conv(net, 2, input_layers=["conv"])
    assert net.conv.in_channels == 6


def test_timm_models_get_their_pretrained_cfg_updated_and_match_native_shapes():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18")
    inflate_first_conv(net, 2)
    cfg = net.pretrained_cfg
    assert cfg["input_size"] == (6, 224, 224) and cfg["in_chans"] == 6
    assert cfg["mean"] == (0.485, 0.456, 0.406) * 2 and cfg["std"] == (0.229, 0.224, 0.225) * 2
    assert timm.data.resolve_data_config({}, model=net)["mean"] == cfg["mean"]
    native = timm.create_model("resnet18", in_chans=6)
    native.load_state_dict(net.state_dict())  # same keys and shapes as a natively built 6-channel model
    hetero = inflate_first_conv(timm.create_model("resnet18"), 2, channels=(3, 1))
    assert hetero.pretrained_cfg["mean"] == (0.485, 0.456, 0.406, pytest.approx(0.449))
