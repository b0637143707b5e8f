"""What only a GPU can show: device and dtype kept on CUDA, and the guarantees there (skipped without CUDA)."""

import copy

import pytest
import torch
from torch import nn

from inflate import inflate_first_conv, pin_batchnorm, split_frozen, finetune
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["resnet18", "repvgg_a0", "vit_tiny_patch16_224", "tresnet_m"])
def test_cuda_float64_equivalences(name):
    torch.manual_seed(0)
    kwargs = {"img_size": 64} if name.startswith("vit") else {}
    net = timm.create_model(name, **kwargs).cuda().double().eval()
    example = torch.zeros(1, 3, 64, 64, device="cuda", dtype=torch.float64)
    zero = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=example)
    rep = inflate_first_conv(copy.deepcopy(net), 3, init="repeat", example_input=example)
    assert all(p.is_cuda and p.dtype == torch.float64 for p in zero.parameters())
    xs = list(torch.randn(2, 2, 3, 64, 64, device="cuda", dtype=torch.float64))
    assert_zero_inflation_equivalent(net, zero, xs)
    assert_repeat_equivalent(net, rep, xs[0], 3)


def test_cuda_half_precision_keeps_dtype_and_is_close():
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)).cuda().half().eval()
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="zero",
                              example_input=torch.zeros(1, 3, 16, 16, device="cuda", dtype=torch.half))
    assert wide[0].weight.dtype == torch.half and wide[0].weight.is_cuda
    xs = list(torch.randn(2, 2, 3, 16, 16, device="cuda", dtype=torch.half))
    assert_zero_inflation_equivalent(net, wide, xs)


def test_cuda_cached_features_and_pinned_batchnorm():
    net = timm.create_model("resnet18", num_classes=3).cuda()
    finetune(net, "last", example_input=torch.zeros(1, 3, 64, 64, device="cuda"))
    pin = pin_batchnorm(net, "eval")
    split = split_frozen(net.train())
    x = torch.randn(4, 3, 64, 64, device="cuda")
    torch.testing.assert_close(split.tail(*split.prefix(x)), net(x))
    pin.remove()
