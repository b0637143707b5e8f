"""Weight-standardized stems (timm's StdConv2d family, transformers' BiT conv) widened per input:
exact under every rule, still standardizing, and saved and loaded like any inflated model.

float64 throughout: a wrong block (a whole-fan-in standardization of widened zeros or copies)
changes the layer's output by a relative amount of order one, rounding by ~1e-15; 1e-10 leaves
room for the rounding of a few layers and none for a wrong construction.
"""

import copy
import io

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn

from inflate import InflateError, find_input_layers, inflate_first_conv
from inflate._standardized import _weight
from inflate.rules import inflate_kernel
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

std_conv = pytest.importorskip("timm.layers.std_conv")

D = torch.float64
RTOL = 1e-10
CLASSES = ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"]


class Stem(nn.Module):
    """A weight-standardized stem and a plain conv after it, as in BiT and NF-Nets."""

    def __init__(self, cls: str, c: int, out: int, k: int, stride: int, eps: float, bias: bool, seed: int):
        super().__init__()
        self.conv = getattr(std_conv, cls)(c, out, k, stride=stride, eps=eps, bias=bias)
        self.head = nn.Conv2d(out, 3, 1)
        self.input_shape = (c, 9, 9)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():  # an offset per output channel: the mean matters
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 + torch.rand(p.shape[:1] + (1,) * (p.ndim - 1),
                                                                                 generator=gen))
                        + (torch.randn(p.shape[:1] + (1,) * (p.ndim - 1), generator=gen) if p.ndim == 4 else 0))
        self.double().eval()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


@st.composite
def stems(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    c = draw(st.integers(2 if k == 1 else 1, 4))  # a fan-in of one standardizes to nothing: batch_norm refuses it
    net = Stem(draw(st.sampled_from(CLASSES)), c, draw(st.integers(1, 5)), k, draw(st.integers(1, 2)),
               draw(st.sampled_from([1e-8, 1e-6, 1e-2, 1.0])),  # large eps: where scaling blocks would show
               draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))
    note(f"{type(net.conv).__name__} {tuple(net.conv.weight.shape)} stride {net.conv.stride} eps {net.conv.eps}")
    return net


def _inputs(net, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, *net.input_shape, generator=gen, dtype=D) for _ in range(n)]


def _example(net):
    return torch.zeros(1, *net.input_shape, dtype=D)


def _gain(conv):
    return (conv.gain * conv.scale).view(-1, 1, 1, 1) if hasattr(conv, "gain") else 1.0


@given(net=stems(), n=st.integers(2, 3), seed=st.integers(0, 2**31 - 1))
def test_zero_rule_gives_the_original_output_whatever_the_other_inputs_hold(net, n, seed):
    wide = inflate_first_conv(copy.deepcopy(net), n, init="zero", example_input=_example(net))
    assert isinstance(wide.conv, type(net.conv)) and wide.conv.in_channels == n * net.conv.in_channels
    assert_zero_inflation_equivalent(net, wide, _inputs(net, n, seed), compare_at=["conv"], rtol=RTOL)


@given(net=stems(), n=st.integers(2, 3), seed=st.integers(0, 2**31 - 1))
def test_scaled_repeat_gives_the_original_output_on_identical_inputs(net, n, seed):
    wide = inflate_first_conv(copy.deepcopy(net), n, init="repeat", example_input=_example(net))
    assert_repeat_equivalent(net, wide, _inputs(net, 1, seed)[0], n, compare_at=["conv"], rtol=RTOL)


def _callable(kernel, i, c):
    """Blocks of zero mean per output channel: multiples of the standardized kernel, or of its average."""
    if c != kernel.shape[1]:
        kernel = (kernel.sum(1, keepdim=True) / c).expand(-1, c, *kernel.shape[2:])
    return kernel * (i + 1) / 3


@given(net=stems(), n=st.integers(1, 3), init=st.sampled_from(["zero", "repeat", "average", _callable]),
       scale=st.booleans(), other=st.integers(1, 3))
def test_widened_layer_convolves_with_the_rule_applied_to_the_standardized_kernel(net, n, init, scale, other):
    """What every rule promises of a plain kernel holds of the kernel the layer really
    convolves with: ``gain * rule(K)``, ``K`` the standardized original (inputs of another
    channel count included)."""
    c = net.conv.in_channels
    channels = [c] * n + [max(other, 3 - net.conv.kernel_size[0])]  # fan-in >= 2, as in the strategy
    with torch.no_grad():
        gain = _gain(net.conv)
        k = _weight(net.conv) / gain
        expected = gain * (inflate_kernel(k.unsqueeze(2).unsqueeze(2), channels, init, scale).squeeze(3).squeeze(2)
                           if callable(init) else inflate_kernel(k, channels, init, scale))
        wide = inflate_first_conv(copy.deepcopy(net), n + 1, init=init, scale=scale, channels=channels,
                                  example_input=_example(net))
        # atol at the kernel's scale: an average of K can be rounding noise where K's channels cancel
        torch.testing.assert_close(_weight(wide.conv), expected, rtol=RTOL, atol=RTOL * _weight(net.conv).abs().max())


@given(net=stems(), n=st.integers(2, 3), init=st.sampled_from(["zero", "repeat", "average"]),
       factor=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_widened_layer_still_standardizes_its_weight(net, n, init, factor, seed):
    """Scaling the stored weight by ``f`` is scaling ``eps`` by ``1/f**2``: the output does not
    change but through eps, exactly so."""
    wide = inflate_first_conv(copy.deepcopy(net), n, init=init, example_input=_example(net))
    x = torch.cat(_inputs(net, n, seed), 1)
    with torch.no_grad():
        before = wide(x)
        wide.conv.weight.mul_(factor)
        wide.conv.eps *= factor**2
        torch.testing.assert_close(wide(x), before, rtol=RTOL, atol=RTOL * before.abs().max())


def test_output_barely_moves_when_the_weight_is_scaled():
    net = Stem("ScaledStdConv2d", 3, 4, 3, 1, 1e-10, True, seed=0)
    wide = inflate_first_conv(net, 2, init="zero", example_input=_example(net))
    x = torch.cat(_inputs(net, 2, 0), 1)
    with torch.no_grad():
        wide.conv.weight[:, 3:].normal_()  # as if input 1 had been trained
        before = wide(x)
        wide.conv.weight.mul_(7.0)
        torch.testing.assert_close(wide(x), before, rtol=1e-7, atol=1e-7)  # eps / var ~ 1e-10


def test_widening_the_stored_weight_naively_is_wrong():
    """Negative control: the plain rules on the stored weight, in the original forward, are far
    off (what timm's own ``adapt_input_conv`` and a hand-widened ``in_chans`` do)."""
    torch.manual_seed(0)
    for cls in CLASSES:
        net = Stem(cls, 3, 4, 3, 1, 1e-6, True, seed=1)
        xs = _inputs(net, 2, 0)
        with torch.no_grad():
            for init, x, expected in (("zero", torch.cat(xs, 1), net(xs[0])),
                                      ("repeat", torch.cat([xs[0]] * 2, 1), net(xs[0]))):
                naive = copy.deepcopy(net)
                naive.conv.weight = nn.Parameter(inflate_kernel(net.conv.weight, [3, 3], init))
                naive.conv.in_channels = 6
                got = naive(x)
                assert (got - expected).abs().max() > 1e-3 * expected.abs().max(), (cls, init)
                right = inflate_first_conv(copy.deepcopy(net), 2, init=init, example_input=_example(net))
                torch.testing.assert_close(right(x), expected, rtol=RTOL, atol=RTOL * expected.abs().max())


def test_a_one_entry_error_is_detected():
    """Negative control of the checks themselves: one stored entry of input 1 off by 1e-6."""
    net = Stem("StdConv2d", 3, 4, 3, 1, 1e-6, False, seed=2)
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=_example(net))
    with torch.no_grad():
        wide.conv.weight[0, 4, 1, 1] += 1e-6
    with pytest.raises(AssertionError):
        assert_repeat_equivalent(net, wide, _inputs(net, 1, 0)[0], 2, compare_at=["conv"], rtol=RTOL)


def test_a_callable_block_that_no_standardization_gives_is_refused():
    net = Stem("StdConv2d", 3, 4, 3, 1, 1e-6, False, seed=3)
    before = net.conv.weight

    def small_noise(kernel, i, c):
        return kernel if i == 0 else torch.full_like(kernel, 0.01)  # mean 0.01: standardized away

    with pytest.raises(InflateError, match="zero mean per output channel"):
        inflate_first_conv(net, 2, init=small_noise, example_input=_example(net))
    assert net.conv.weight is before and type(net.conv) is std_conv.StdConv2d and net.conv.in_channels == 3


def test_inflating_twice_is_exact():
    net = Stem("ScaledStdConv2dSame", 3, 4, 5, 2, 1e-6, True, seed=4)
    xs = _inputs(net, 4, 0)
    twice = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=_example(net))
    inflate_first_conv(twice, 2, init="zero", example_input=torch.zeros(1, 6, 9, 9, dtype=D))
    assert twice.conv.in_channels == 12
    assert_zero_inflation_equivalent(net, twice, xs, compare_at=["conv"], rtol=RTOL)
    rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=_example(net))
    inflate_first_conv(rep, 3, init="repeat", example_input=torch.zeros(1, 6, 9, 9, dtype=D))
    assert_repeat_equivalent(net, rep, xs[0], 6, compare_at=["conv"], rtol=RTOL)


@pytest.mark.parametrize("init", ["zero", "repeat", "average"])
def test_saved_and_loaded(init):
    """torch.save of the model keeps everything (the class is rebuilt by name); the state dict
    has the original keys and loads into the model inflated the same way. Its shares are not in
    it: under "zero" and "repeat" they are constants (1, 1/N), so any model inflated with that
    rule takes the weights; under "average" they are computed from the pretrained kernel."""
    net = Stem("ScaledStdConv2d", 3, 4, 3, 1, 1e-6, True, seed=5)
    wide = inflate_first_conv(copy.deepcopy(net), 2, init=init, example_input=_example(net))
    with torch.no_grad():
        wide.conv.weight[:, 3:].normal_()  # fine-tuned: input 1 has weights of its own
        wide.conv.gain.mul_(1.5)
    x = torch.cat(_inputs(net, 2, 0), 1)
    with torch.no_grad():
        _round_trip(net, wide, init, x)


def _round_trip(net, wide, init, x):
    expected = wide(x)
    buffer = io.BytesIO()
    torch.save(wide, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded.conv) is type(wide.conv) and isinstance(loaded.conv, std_conv.ScaledStdConv2d)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert list(wide.state_dict()) == list(net.state_dict())
    rebuilt = inflate_first_conv(copy.deepcopy(net) if init == "average" else Stem("ScaledStdConv2d", 3, 4, 3, 1, 1e-6,
                                                                                   True, seed=6),
                                 2, init=init, example_input=_example(net))
    rebuilt.load_state_dict(wide.state_dict())
    torch.testing.assert_close(rebuilt(x), expected, rtol=RTOL, atol=RTOL * expected.abs().max())
    plain = Stem("ScaledStdConv2d", 6, 4, 3, 1, 1e-6, True, seed=0)  # built for 6 channels: standardizes all six
    plain.load_state_dict(wide.state_dict())
    assert (plain(x) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_registry_is_by_exact_class():
    """A subclass may compute its weight otherwise: it stays refused."""

    class Custom(std_conv.StdConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(Custom(3, 4, 3))
    with pytest.raises(InflateError, match="computes its conv2d weight during forward"):
        find_input_layers(net, torch.zeros(1, 3, 8, 8))
