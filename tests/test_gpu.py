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


def test_frame_pair_batches_are_made_on_the_gpu_as_on_the_cpu():
    """The example makes its training batches on the device it trains on (the random draws stay on the
    CPU): the same samples as on the CPU up to rounding, and a different step is far from them."""
    pytest.importorskip("skimage")
    from examples.frame_pair.data import training_batch

    cpu = training_batch(0, 3, 2, 10, 10, (90, 160))
    gpu = training_batch(0, 3, 2, 10, 10, (90, 160), device="cuda")
    assert gpu[0].is_cuda and gpu[1].is_cuda
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=1e-5)  # coordinates, in [-1, 1]
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=2e-3)  # pixels, in [0, 1]
    other = training_batch(0, 4, 2, 10, 10, (90, 160))
    assert (other[0] - cpu[0]).abs().max() > 0.1 and (other[1] - cpu[1]).abs().max() > 1e-2


def test_zoo_check_runs_on_the_gpu_and_still_catches_a_wrong_rule(monkeypatch):
    """INFLATE_ZOO_DEVICE=cuda: the full sweeps' check runs there (float64 for models too big for
    the CPU); a scaled repeat off by 0.1% is still caught."""
    from . import test_zoo, zoo

    monkeypatch.setattr(test_zoo, "DEVICE", "cuda")
    model, shape, dtype = test_zoo._timm_build("resnet18")
    assert zoo.device_of(model).type == "cuda" and dtype == torch.float64
    assert zoo.outcome(lambda: (model, shape, dtype)) == "exact"

    def off_by_a_thousandth(net, n, init, **kwargs):
        wide = inflate_first_conv(net, n, init=init, **kwargs)
        if init == "repeat":
            with torch.no_grad():
                wide.conv1.weight.mul_(1.001)
        return wide

    monkeypatch.setattr(zoo, "inflate_first_conv", off_by_a_thousandth)
    result = zoo.outcome(lambda: test_zoo._timm_build("resnet18"))
    assert result.startswith("WRONG: inflated model is not equivalent"), result
