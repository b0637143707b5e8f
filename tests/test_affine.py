"""Per-channel affines on the raw input (mean/std buffers, a batch norm on the input) are
widened per input, each input getting its own copy, and the inflated model is exact; the
ones that cannot be widened are refused with the model unchanged."""

import copy

import pytest
import torch
from torch import nn

from inflate import InexactError, find_input_layers, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

D = torch.float64
X = torch.randn(2, 3, 8, 8, dtype=D)


class Normalized(nn.Module):
    """``(x - mean) / std`` with the statistics in buffers, shaped as ``view`` makes them."""

    def __init__(self, form="registered"):
        super().__init__()
        self.form = form
        shape = (1, 3, 1, 1) if form == "registered" else (3,)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406], dtype=D).view(shape))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225], dtype=D).view(shape))
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=D)
        self.head = nn.Conv2d(4, 2, 1, dtype=D)

    def forward(self, x):
        mean, std = self.mean, self.std
        if self.form == "view":  # sized by the buffer itself: follows the widening
            mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1).to(x)
        elif self.form == "indexed":  # torchvision's mean[:, None, None]
            mean, std = mean[:, None, None], std[:, None, None]
        elif self.form == "fixed view":  # a constant 3: the widened buffer no longer fits
            mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        return self.head(torch.relu(self.conv((x - mean) / std)))


class InputBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3, dtype=D)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=D)

    def forward(self, x):
        return self.conv(self.bn(x))


def _calibrated_bn():
    net = InputBatchNorm()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
    return net


def _check_exact(net, compare_at):
    x1, x2 = torch.randn(2, 2, 3, 8, 8, dtype=D)
    zero = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=X)
    rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=X)
    assert_zero_inflation_equivalent(net, zero, [x1, x2], compare_at=compare_at, rtol=1e-12)
    assert_repeat_equivalent(net, rep, x1, 2, compare_at=compare_at, rtol=1e-12)
    with pytest.raises(AssertionError):  # negative control: the repeat model is not zero-exact
        assert_zero_inflation_equivalent(net, rep, [x1, x2], rtol=1e-6)
    return zero


@pytest.mark.parametrize("form", ["registered", "view", "indexed"])
def test_mean_std_buffers_are_widened_per_input(form):
    net = Normalized(form).eval()
    zero = _check_exact(net, ["conv"])
    assert zero.mean.shape[zero.mean.ndim - 3 if form == "registered" else 0] == 6
    assert torch.equal(zero.mean.flatten()[:3], net.mean.flatten()) and torch.equal(zero.mean.flatten()[3:],
                                                                                     net.mean.flatten())


def test_a_batch_norm_on_the_input_is_widened_per_input_in_eval_mode():
    net = _calibrated_bn().eval()
    zero = _check_exact(net, ["conv"])
    assert zero.bn.num_features == 6 and zero.bn.running_mean.shape == (6,)
    assert set(zero.bn.state_dict()) == set(net.bn.state_dict())  # checkpoints keep their keys


def test_a_batch_norm_on_the_input_in_train_mode_keeps_each_inputs_statistics():
    """In train mode every channel is normalised by its own batch statistics: input 1's are the
    original's, so the zero rule stays exact, and each input's running statistics are its own."""
    net = _calibrated_bn().train()
    x1, x2 = torch.randn(2, 4, 3, 8, 8, dtype=D)
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=X)
    with torch.no_grad():
        expected, got = net(x1), wide(torch.cat([x1, x2], 1))
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(wide.bn.running_mean[:3], net.bn.running_mean, rtol=1e-12, atol=0)
    assert not torch.allclose(wide.bn.running_mean[3:], net.bn.running_mean)  # input 2's own statistics


def test_per_channel_operands_that_cannot_be_widened_are_refused():
    for net, message in [
        (Normalized("fixed view"), r"gives shapes \[\(1, 3, 1, 1\)\] on the inflated model|"
                                   r"could not run|cannot read its new input"),
    ]:
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with pytest.raises(InexactError, match=message):
            inflate_first_conv(net, 2, example_input=X)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    class Constant(nn.Module):  # made in forward: nothing to widen
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))

    with pytest.raises(InexactError, match=r"per-channel operand of shape \(1, 3, 1, 1\)"):
        find_input_layers(Constant(), X.float())

    class SharedStats(Normalized):  # the same buffer also scales a feature map
        def forward(self, x):
            y = self.conv((x - self.mean) / self.std)
            return self.head(torch.cat([y[:, :3] * self.std, y[:, 3:]], 1))

    with pytest.raises(InexactError, match=r"'std' is applied to the input channel by channel and also read"):
        find_input_layers(SharedStats(), X)
