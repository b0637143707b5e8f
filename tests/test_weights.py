"""The tensor math of the rules, checked against the operations they must reproduce."""

import pytest
import torch
import torch.nn.functional as F

from inflate import InflateError
from inflate.rules import KernelLayout, from_canonical, inflate_kernel, to_canonical

D = torch.float64


def test_repeat_unscaled_is_the_studys_weight_repeat():
    w = torch.randn(8, 3, 3, 3, dtype=D)
    got = from_canonical(inflate_kernel(to_canonical(w, KernelLayout("conv")), [3, 3], "repeat", scale=False),
                         KernelLayout("conv"))
    assert torch.equal(got, w.repeat(1, 2, 1, 1))


def test_repeat_scaled_divides_by_n_and_zero_keeps_only_input_one():
    k = torch.randn(4, 3, 1, 1, 5, dtype=D)
    rep = inflate_kernel(k, [3, 3, 3], "repeat")
    assert torch.allclose(rep, torch.cat([k / 3] * 3, 1), rtol=0, atol=0)
    zero = inflate_kernel(k, [3, 3], "zero")
    assert torch.equal(zero[:, :3], k) and not zero[:, 3:].any()


def test_average_gives_the_original_response_to_a_constant_input():
    k = torch.randn(4, 3, 1, 1, 3, 3, dtype=D)
    avg = inflate_kernel(k, [1, 2], "average", scale=False)
    assert avg.shape == (4, 3, 1, 1, 3, 3)
    assert torch.allclose(avg[:, :1].sum(1), k.sum(1)) and torch.allclose(avg[:, 1:].sum(1), k.sum(1))
    # negative control: the plain mean (without rescaling) would not
    assert not torch.allclose(k.mean(1) * 2, k.sum(1))


def test_heterogeneous_repeat_uses_average_for_other_channel_counts():
    k = torch.randn(2, 3, 1, 1, dtype=D)
    got = inflate_kernel(k, [3, 2, 1], "repeat", scale=False)
    assert torch.equal(got[:, :3], k)
    assert torch.allclose(got[:, 3:5], (k.sum(1, keepdim=True) / 2).expand(2, 2, 1, 1))
    assert torch.allclose(got[:, 5:], k.sum(1, keepdim=True))


def test_callable_rule_and_its_shape_check():
    k = torch.randn(2, 3, 1, 1, dtype=D)
    got = inflate_kernel(k, [3, 3], lambda kern, i, c: kern * (i + 1))
    assert torch.equal(got, torch.cat([k, 2 * k], 1))
    with pytest.raises(InflateError, match=r"expected a block of shape \(2, 3, 1, 1\), got \(2, 1, 1, 1\)"):
        inflate_kernel(k, [3, 3], lambda kern, i, c: kern[:, :1])
    with pytest.raises(InflateError, match="expected one of"):
        inflate_kernel(k, [3, 3], "copy")


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_kernels_densify_to_the_same_convolution(groups, transposed):
    x = torch.randn(2, 4, 7, 7, dtype=D)
    if transposed:
        w = torch.randn(4, 8 // groups, 3, 3, dtype=D)
        ref = F.conv_transpose2d(x, w, groups=groups)
        layout = KernelLayout("transposed", groups)
        got = F.conv_transpose2d(x, from_canonical(to_canonical(w, layout), layout))
    else:
        w = torch.randn(8, 4 // groups, 3, 3, dtype=D)
        ref = F.conv2d(x, w, groups=groups)
        layout = KernelLayout("conv", groups)
        got = F.conv2d(x, from_canonical(to_canonical(w, layout), layout))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_linear_patch_layout_round_trips_and_places_channels():
    # features ordered (p1 p2 c): outer = 4 patch positions, C = 3, inner = 1
    w = torch.arange(5 * 12, dtype=D).reshape(5, 12)
    layout = KernelLayout("linear", outer=4, inner=1)
    canon = to_canonical(w, layout)
    assert canon.shape == (5, 3, 4, 1)
    assert torch.equal(from_canonical(canon, layout), w)
    assert torch.equal(canon[:, 1, 2, 0], w[:, 2 * 3 + 1])


def _edit_in_place_then_fail(kernel, i, c):
    kernel.mul_(0)
    raise RuntimeError("user code failed after editing its argument")


def test_an_init_callable_that_edits_its_argument_and_raises_leaves_the_model_unchanged():
    from torch import nn

    from inflate import inflate_first_conv

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).to(D)
    before = model[0].weight.detach().clone()
    with pytest.raises(Exception):  # whatever the error is (the user's, or one wrapping it)
        inflate_first_conv(model, 2, init=_edit_in_place_then_fail, example_input=torch.zeros(1, 3, 8, 8, dtype=D))
    assert torch.equal(model[0].weight, before) and model[0].in_channels == 3


def test_an_init_callable_gets_its_own_copy_of_the_kernel():
    w = torch.randn(4, 3, 3, 3, dtype=D)
    kernel = to_canonical(w, KernelLayout("conv"))
    seen = []

    def scale_in_place(kern, i, c):
        seen.append(kern)
        return kern.mul_(i + 2)

    got = inflate_kernel(kernel, [3, 3], scale_in_place)
    assert torch.equal(got, torch.cat([2 * kernel, 3 * kernel], 1))  # each call edited a fresh copy
    assert seen[0].data_ptr() not in (w.data_ptr(), seen[1].data_ptr())
    # control: the canonical kernel is a view of the weight, so without the copy the edit reaches it
    with pytest.raises(RuntimeError, match="user code failed"):
        _edit_in_place_then_fail(kernel, 0, 3)
    assert not w.any()
