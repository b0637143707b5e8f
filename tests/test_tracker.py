"""The tracker cannot be fooled: every way a hand-written forward could make an inflated
model silently wrong, or unable to read its new input, is refused (and the model left
untouched); the harmless look-alikes are accepted and exact in float64."""

import copy

import pytest
import torch
from torch import nn

import inflate
from inflate import InexactError, InflateError, TraceError, find_input_layers, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

D = torch.float64
X = torch.randn(2, 3, 8, 8, dtype=D)


class Net(nn.Module):
    """A conv stem after ``pre(self, x)``, then a head: the forwards under test."""

    def __init__(self, pre):
        super().__init__()
        self.pre = pre
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(self.pre(self, x))))


def _branch(self, x):
    if x.mean() > 0.1:  # a decision on input values
        return x * 2
    return x


def _item_scale(self, x):
    return x / x.abs().max().item()


def _inplace_channel(self, x):
    x = x.clone()
    x[:, 0] *= 2
    return x


def _normalize_loop(self, x):
    x = x.clone()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for i in range(x.shape[1]):
        x[:, i] = (x[:, i] - mean[i]) / std[i]
    return x


def _inplace_view(self, x):  # the write goes through a view; the base is what the conv reads
    x = x.clone()
    view = x[:, 1:2]
    view.mul_(3)
    return x


def _index_put(self, x):
    x = x.clone()
    x.index_put_((torch.tensor([0]),), torch.zeros(3, 8, 8, dtype=x.dtype))
    return x


def _channel_count(self, x):
    return x / x.shape[1]


def _explicit_stop(self, x):
    return x[:, :3]


def _explicit_write(self, x):  # a write sized for C: only the first input's channels on N*C
    x = x.clone()
    x[:, :3] = 0.5
    return x


def _fixed_view(self, x):  # a constant 3 that the inflated input no longer fits
    return x.reshape(x.shape[0], 3, -1).reshape(x.shape[0], 3, x.shape[2], x.shape[3])


def _rgb_only(self, x):
    if x.shape[1] != 3:
        raise ValueError("expects RGB")
    return x


def _stored_count(self, x):  # the count goes into an attribute and comes back as a factor
    self.count = x.size(1)
    return x * (1.0 / self.count)


def _copy_into_some_channels(self, x):  # a blank with a fixed 4 channels: the input fills only some
    buf = x.new_zeros(x.shape[0], 4, *x.shape[2:])
    buf[:, : x.shape[1]].copy_(x)
    return buf[:, :3]


def _stale_view(self, x):  # a view of the blank taken before the input is copied in: it holds the input
    buf = x.new_zeros(x.shape)
    early = buf[:, :]
    buf.copy_(x)
    return buf * early.mean(1, keepdim=True)  # a mean over the channels, through the untagged view


def _filled_from_input(self, x):  # a blank whose one value is computed from the input
    return x + torch.full(x.shape, x.mean(), dtype=x.dtype)


REFUSED = {
    "branch on input values": (_branch, r"Tensor.__bool__ in '<root>' \(Net\) turns input-derived values"),
    "item() as a scale": (_item_scale, r"Tensor.item in '<root>' \(Net\) turns input-derived values"),
    "in-place write into one channel": (_inplace_channel, r"in-place mul on a view of the input"),
    "per-channel normalisation loop": (_normalize_loop, r"reads the input only after indexing into the channel"),
    "in-place write through a channel view": (_inplace_view, r"in-place mul on a view of the input"),
    "index_put_": (_index_put, r"Tensor.index_put_, an operation inflate does not know"),
    "x / x.shape[1]": (_channel_count, r"gets 3 on the original model and 6 on the inflated one"),
    "x[:, :3]": (_explicit_stop, r"Tensor.__getitem__ in '<root>' \(Net\) gives shapes \[\(2, 3, 8, 8\)\] on the "
                                 r"inflated model, expected \[\(2, 6, 8, 8\)\]"),
    "x[:, :3] = 0": (_explicit_write, r"__setitem__ into some channels of the input"),
    "constant reshape": (_fixed_view, r"Tensor.reshape in '<root>' \(Net\) gives shapes \[\(2, 3, 128\)\] on the "
                                      r"inflated model, expected \[\(2, 6, 64\)\]"),
    "the model's own channel check": (_rgb_only, r"the inflated model cannot read its new input of shape \(2, 6, 8, 8\): "
                                                 r"'<root>' \(Net\) raised ValueError: expects RGB"),
    "count kept in an attribute": (_stored_count, r"gets 0.333\d* on the original model and 0.166\d* on the "),
    "copy into some channels of a blank": (_copy_into_some_channels, r"after a copy of the input into some "
                                                                     r"channels of another tensor"),
    "filled with an input-derived value": (_filled_from_input, r"after full filled with an input-derived value"),
    "a view taken before the copy": (_stale_view, r"after a view taken before the input was copied into its tensor"),
}


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}, [(n, m.in_channels) for n, m in
                                                                  net.named_modules() if hasattr(m, "in_channels")]


@pytest.mark.parametrize("init", ["zero", "repeat"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_forwards_that_would_be_wrong_or_broken_are_refused_and_change_nothing(case, init):
    pre, message = REFUSED[case]
    net = Net(pre).double()
    before, widths = _state(net)
    with pytest.raises(InexactError, match=message):
        inflate_first_conv(net, 2, init=init, example_input=X)
    after, widths_after = _state(net)
    assert widths_after == widths and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(net, "count")  # what the traced forward set is not left behind


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_refused_forwards_really_are_wrong_or_broken_when_inflated_by_hand(case):
    """Negative control: widening the conv by hand (no check) gives a model that either
    fails on the 6-channel input or differs from the original on input 1 (zero rule) or on
    identical inputs (repeat rule) -- so every refusal above guards a real failure."""
    pre, _ = REFUSED[case]
    torch.manual_seed(0)  # fixed weights: a draw whose ReLU kills every response would hide any change
    net = Net(pre).double().eval()
    with torch.no_grad():
        net.conv.bias.abs_()  # the small first input keeps some positive responses
    x1 = torch.rand(2, 3, 8, 8, dtype=D) * 0.1 + 0.01  # small: below the branch's threshold, ...
    x2 = torch.rand(2, 3, 8, 8, dtype=D) * 10  # ... which the second input takes the mean over
    with torch.no_grad():
        before = net(x1)
        zero, rep = copy.deepcopy(net), copy.deepcopy(net)
        for wide, w in ((zero, torch.cat([net.conv.weight, torch.zeros_like(net.conv.weight)], 1)),
                        (rep, torch.cat([net.conv.weight, net.conv.weight], 1) / 2)):
            wide.conv.weight = nn.Parameter(w)
            wide.conv.in_channels = 6
        try:
            out_zero, out_rep = zero(torch.cat([x1, x2], 1)), rep(torch.cat([x1, x1], 1))
        except Exception:  # noqa: BLE001 - any failure on the new input
            return  # broken: cannot read its new input
    wrong = [not torch.allclose(out, before, rtol=1e-9, atol=0) for out in (out_zero, out_rep)]
    assert any(wrong), f"{case}: neither rule changes the output, so refusing it guards nothing"


def _unpack_shape(self, x):  # timm's patch embeddings: read the shape, never use C
    b, c, h, w = x.shape
    assert h == w
    return x


def _spatial_inplace(self, x):  # an in-place write into a row of every channel alike
    x = x.clone()
    x[:, :, 0] *= 2
    return x


def _view_by_count(self, x):  # a reshape sized by the channel count keeps the block
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).reshape(b, c, h, w)


def _keyword_transpose(self, x):  # channels-last and back, written with keywords
    y = torch.transpose(input=x, dim0=1, dim1=3)
    return torch.transpose(y, dim0=3, dim1=1) + 1


def _weight_branch(self, x):  # a decision on weights, not on the input: real run, still exact
    return x * 2 if self.conv.weight.sum().item() > -1e9 else x


def _slice_by_count(self, x):  # a slice sized by the channel count takes every channel of N*C too
    return x[:, : x.shape[1]] * 2


def _padded_batch(self, x):  # torchvision's batch_images: a blank sized from the input, each image copied in
    b, c, h, w = x.shape
    batch = x.new_full((b, c, h + 2, w + 3), 0)
    for i in range(b):
        batch[i, :c, :h, :w].copy_(x[i])
    return batch


def _unfolded_patches(self, x):  # TNT's pixel embedding: im2col, then each patch as a small image
    b, c, h, w = x.shape
    patches = torch.nn.functional.unfold(x, kernel_size=4, stride=4)  # (B, C*16, L)
    return patches.transpose(1, 2).reshape(-1, c, 4, 4)


ACCEPTED = {"unfolded patches": _unfolded_patches, "padded batch": _padded_batch, "unpacked shape": _unpack_shape, "slice by channel count": _slice_by_count, "spatial in-place": _spatial_inplace,
            "reshape by channel count": _view_by_count, "keyword transpose": _keyword_transpose,
            "branch on a weight": _weight_branch}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_harmless_look_alikes_are_accepted_and_exact(case):
    net = Net(ACCEPTED[case]).double().eval()
    x1, x2 = torch.randn(2, 2, 3, 8, 8, dtype=D)
    zero = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=X)
    rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=X)
    assert zero.conv.in_channels == rep.conv.in_channels == 6
    assert_zero_inflation_equivalent(net, zero, [x1, x2], compare_at=["conv"], rtol=1e-12)
    assert_repeat_equivalent(net, rep, x1, 2, compare_at=["conv"], rtol=1e-12)
    with pytest.raises(AssertionError):  # negative control: the other rule's model is not zero-exact
        assert_zero_inflation_equivalent(net, rep, [x1, x2], compare_at=["conv"], rtol=1e-6)


def test_escapes_of_weights_or_constants_are_not_the_inputs():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            scale = float(self.conv.weight.abs().max())  # Python escape of a weight: fine
            return self.conv(x) * scale

    assert find_input_layers(Scaled().double(), X) == ["conv"]


def test_unknown_operations_are_reported_as_unknown_not_as_mixing():
    net = Net(lambda self, x: torch.fliplr(x))
    with pytest.raises(InexactError, match=r"torch.fliplr, an operation inflate does not know in .*; if it treats every "
                                           r"channel alike .* please report it"):
        find_input_layers(net)
    with pytest.raises(InexactError, match=r"after group_norm in .*, which mixes or transforms channels"):
        find_input_layers(Net(lambda self, x: nn.functional.group_norm(x, 1)))


def test_trace_errors_and_inexact_errors_are_told_apart():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            raise RuntimeError("the model's own failure")

    with pytest.raises(TraceError, match=r"in '<root>' \(Broken\).*the model's own failure"):
        find_input_layers(Broken(), torch.zeros(1, 3, 4, 4))
    assert issubclass(TraceError, InflateError) and issubclass(InexactError, InflateError)
    # input_layers= falls back on an untraceable model only ...
    net = Broken()
    inflate_first_conv(net, 2, input_layers=["conv"])
    assert net.conv.in_channels == 6
    # ... never on a model that traces and is inexact
    with pytest.raises(InexactError):
        inflate_first_conv(Net(_branch), 2, input_layers=["conv"], example_input=X.float())


def test_inflates_own_failures_are_not_reported_as_the_models(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(inflate._tags, "propagate", broken)
    with pytest.raises(InflateError, match=r"a bug in inflate, please report it") as caught:
        find_input_layers(Net(lambda self, x: x * 2))
    assert not isinstance(caught.value, TraceError)


def test_the_real_run_is_tracked_like_the_meta_one():
    """A forward that cannot run on meta (``item()`` on a weight) runs for real on the
    example; the same escapes and channel-count uses are caught there."""

    def both(self, x):
        _weight_branch(self, x)
        return _channel_count(self, x)

    with pytest.raises(InexactError, match=r"gets 3 on the original model and 6 on the inflated one"):
        inflate_first_conv(Net(both).double(), 2, example_input=X)
    with pytest.raises(InexactError, match=r"Tensor.__bool__"):
        inflate_first_conv(Net(lambda self, x: _branch(self, _weight_branch(self, x))).double(), 2,
                           example_input=X)


def test_the_op_table_declares_each_function_once_and_every_name_resolves():
    from inflate import _ops

    declared = {name for names in _ops._KINDS.values() for name in names.split()}
    resolved = {op.name for op in _ops.TABLE.values()}
    assert declared == resolved, f"names that match no torch function: {declared - resolved}"
    # the forms a TorchFunctionMode receives are keys of one declaration
    forms = [torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_,
             torch.Tensor.__iadd__]
    assert {_ops.lookup(f) for f in forms} == {_ops.Op("pointwise", "add")}
    assert _ops.lookup(torch.Tensor.shape.__get__).kind == "size"
    assert _ops.lookup(torch.fliplr) is None  # unknown, reported as such


class _Reader(nn.Module):
    """A submodule that reads the input's shape (as timm's patch embeddings do) and then
    hands the channel count on in one of the ways the replay must not stop early for."""

    def __init__(self, leak):
        super().__init__()
        self.leak = leak

    def forward(self, x, info=None):
        b, c, h, w = x.shape
        if self.leak == "attribute":
            self.count = c
        elif self.leak == "return":
            return x, c
        elif self.leak == "dict":
            info["count"] = c
        return x


class _Leaky(nn.Module):
    def __init__(self, leak):
        super().__init__()
        self.reader = _Reader(leak)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.leak = leak

    def forward(self, x):
        info = {}
        if self.leak == "return":
            x, count = self.reader(x)
        else:
            x = self.reader(x, info) if self.leak == "dict" else self.reader(x)
            count = {"attribute": lambda: self.reader.count, "dict": lambda: info["count"],
                     "none": lambda: 3}[self.leak]()
        y = self.conv(x)
        return y * (1.0 / count)  # after the last widened layer: only a full replay sees it


@pytest.mark.parametrize("leak", ["attribute", "return", "dict"])
def test_a_channel_count_carried_out_of_the_reading_module_is_caught_after_the_widened_layer(leak):
    net = _Leaky(leak).double()
    with pytest.raises(InexactError, match=r"gets 0.333\d* on the original model and 0.166\d* on the inflated"):
        inflate_first_conv(net, 2, example_input=X)
    assert net.conv.in_channels == 3


def test_a_shape_read_kept_inside_a_submodule_lets_the_replay_stop_after_it():
    from inflate._discovery import discover

    contained, leaky = discover(_Leaky("none").double(), X), discover(_Leaky("attribute").double(), X)
    assert contained.replay_until is not None and leaky.replay_until is None
    net = _Leaky("none").double()
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=X)
    x1, x2 = torch.randn(2, 2, 3, 8, 8, dtype=D)
    assert_zero_inflation_equivalent(net, wide, [x1, x2], compare_at=["conv"], rtol=1e-12)


def _copy_into_buffer(self, x):  # the input copied into a fresh buffer, then a row overwritten alike
    buf = torch.empty_like(x)
    buf.copy_(x)
    buf[:, :, 0].copy_(torch.zeros(()))
    return buf


def _copy_per_channel(self, x):
    x = x.clone()
    x.copy_(x * torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype).view(1, 3, 1, 1))
    return x


def test_copy_is_followed_like_its_out_of_place_form():
    net = Net(_copy_into_buffer).double().eval()
    x1, x2 = torch.randn(2, 2, 3, 8, 8, dtype=D)
    rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=X)
    assert_repeat_equivalent(net, rep, x1, 2, compare_at=["conv"], rtol=1e-12)
    zero = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=X)
    assert_zero_inflation_equivalent(net, zero, [x1, x2], compare_at=["conv"], rtol=1e-12)
    with pytest.raises(InexactError, match=r"per-channel operand of shape \(1, 3, 1, 1\)"):
        inflate_first_conv(Net(_copy_per_channel).double(), 2, example_input=X)


class _ListNormalised(nn.Module):
    """torchvision's detection transform: the mean and std are Python lists on the module."""

    def __init__(self, reuse=False):
        super().__init__()
        self.mean, self.std, self.reuse = [0.5, 0.4, 0.3], (0.2, 0.25, 0.3), reuse
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        mean = torch.as_tensor(self.mean, dtype=x.dtype)
        x = (x - mean[:, None, None]) / torch.as_tensor(self.std, dtype=x.dtype)[:, None, None]
        out = self.conv(x)
        if self.reuse:  # the same list read again, not channel by channel: a second use
            out = out * torch.as_tensor(self.mean, dtype=x.dtype).sum()
        return out


def test_a_list_of_channel_values_on_a_module_is_widened_per_input():
    net = _ListNormalised().double().eval()
    x1, x2 = torch.randn(2, 2, 3, 8, 8, dtype=D)
    zero = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=X)
    rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=X)
    assert zero.mean == [0.5, 0.4, 0.3] * 2 and zero.std == (0.2, 0.25, 0.3) * 2  # the type is kept
    assert_zero_inflation_equivalent(net, zero, [x1, x2], compare_at=["conv"], rtol=1e-12)
    assert_repeat_equivalent(net, rep, x1, 2, compare_at=["conv"], rtol=1e-12)
    mixed = inflate_first_conv(copy.deepcopy(net), 2, channels=[3, 1], example_input=X)
    assert mixed.mean == pytest.approx([0.5, 0.4, 0.3, 0.4])  # another count: the mean, as timm's configs
    # negative control: the conv widened by hand, the lists left alone: the model cannot read 6 channels
    by_hand = copy.deepcopy(zero)
    by_hand.mean, by_hand.std = net.mean, net.std
    with pytest.raises(RuntimeError):
        by_hand(torch.cat([x1, x2], 1))


def test_a_list_of_channel_values_also_read_elsewhere_is_refused():
    net = _ListNormalised(reuse=True).double().eval()
    with pytest.raises(InexactError, match=r"'mean' is applied to the input channel by channel and also"):
        inflate_first_conv(net, 2, init="zero", example_input=X)
    assert net.mean == [0.5, 0.4, 0.3] and net.conv.in_channels == 3
    # negative control: widened per input anyway, the second use sums six values instead of three
    wide = inflate_first_conv(_ListNormalised().double().eval(), 2, init="zero", example_input=X)
    wide.reuse = True
    x1, x2 = torch.randn(2, 2, 3, 8, 8, dtype=D)
    with pytest.raises(AssertionError):
        assert_zero_inflation_equivalent(net, wide, [x1, x2], rtol=1e-6)
