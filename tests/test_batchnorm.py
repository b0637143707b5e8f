"""Batch-norm pins survive train()/eval(), can be removed, and guard against tiny batches."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from inflate import InflateError, pin_batchnorm


def _net(bn=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(3, 4, 1), bn(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pin_survives_train_and_eval(mode):
    net = _net()
    pin = pin_batchnorm(net, mode)
    x = torch.randn(4, 3, 5, 5)
    for flip in (net.train, net.eval, net.train):
        flip()
        assert net[1].training is (mode == "train")
        before = net[1].num_batches_tracked.item()
        net(x)
        assert net[1].num_batches_tracked.item() == before + (mode == "train")
    pin.remove()
    net.eval()
    assert not net[1].training
    net.train()
    assert net[1].training  # follows the model again


def test_pinned_outputs_equal_between_phases_and_unpinned_ones_differ():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(1, 3, 6, 6)  # a single-element batch, as in the study
    with pin_batchnorm(net, "train", small_batch="ignore"):
        a = net.train()(x)
        b = net.eval()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a, b = net.train()(x), net.eval()(x)  # control: without the pin, train and eval differ
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bn", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])
def test_all_batch_norm_kinds_are_pinned(bn):
    net = nn.Sequential(bn(4))
    with pin_batchnorm(net, "eval") as pin:
        net.train()
        assert list(pin.modules) == ["0"] and not net[0].training


def test_timm_batchnormact_is_pinned():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    model = timm.create_model("tf_efficientnet_lite0")
    pin = pin_batchnorm(model, "eval")
    assert any(isinstance(m, BatchNormAct2d) for m in pin.modules.values())
    model.train()
    assert not any(m.training for m in pin.modules.values())


def test_no_batch_norm_is_a_no_op():
    net = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pin_batchnorm(net, "train") as pin:
        assert pin.modules == {}
        net.eval()
        assert not net.training


def test_pinned_models_deepcopy_and_pickle():
    net = _net()
    pin_batchnorm(net, "eval")
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        clone.train()
        assert not clone[1].training
    buffer = io.BytesIO()
    torch.save(net, buffer)


_ONE_SAMPLE = (r"batch norm '1' \(BatchNorm2d\) pinned to train mode: expected a batch of at least 2 samples, "
               r"got 1 \(shape \(1, 4, 3, 3\)\); each channel would be normalized over the 9 spatial position\(s\) "
               r"of that one sample only")


@pytest.mark.parametrize("action", ["raise", "warn"])
def test_a_batch_of_one_sample_normalized_over_its_positions_is_caught(action):
    net = _net()
    one = torch.randn(1, 3, 3, 3)
    net.train()(one)  # PyTorch accepts it: 9 values per channel, all from one sample
    with pin_batchnorm(net, "train", small_batch=action):
        if action == "raise":
            before = net[1].num_batches_tracked.item()
            with pytest.raises(InflateError, match=_ONE_SAMPLE):
                net(one)
            assert net[1].num_batches_tracked.item() == before  # refused before the statistics moved
        else:
            with pytest.warns(UserWarning, match=_ONE_SAMPLE):
                net(one)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            net(torch.randn(2, 3, 3, 3))  # control: a batch of two passes silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.train()(one)  # control: without the pin nothing is guarded


def test_a_single_value_per_channel_is_caught_before_pytorch_raises():
    net = _net()
    with pin_batchnorm(net, "train", small_batch="warn", min_batch=1):
        with pytest.warns(UserWarning, match=r"expected more than 1 value per channel, got shape \(1, 4, 1, 1\)"):
            with pytest.raises(ValueError):  # PyTorch itself cannot normalize one value
                net(torch.randn(1, 3, 1, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            net(torch.randn(1, 3, 3, 3))  # min_batch=1: a single image is accepted
    with pin_batchnorm(net, "eval", small_batch="raise"):
        net(torch.randn(1, 3, 1, 1))  # eval mode uses running statistics: nothing to guard


def test_a_trace_on_the_meta_device_is_not_guarded():
    from inflate import layers

    net = _net()
    with pin_batchnorm(net, "train", small_batch="raise"):
        assert layers(net, torch.zeros(1, 3, 3, 3)) == ["0", "3"]  # traced on meta: no statistics computed
        with pytest.raises(InflateError):
            net(torch.zeros(1, 3, 3, 3))  # control: the same input for real is refused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "test"}, "mode: expected one of"), ({"mode": "eval", "small_batch": "loud"}, "small_batch"),
     ({"mode": "eval", "min_batch": 0}, "min_batch: expected an int >= 1, got 0")],
)
def test_arguments_are_checked(kwargs, message):
    with pytest.raises(InflateError, match=message):
        pin_batchnorm(_net(), **kwargs)


def _mode(net, x=None):
    """The mode ``net[1]`` runs in, after checking that ``.training`` said so before the forward pass."""
    said = net[1].training
    before = net[1].num_batches_tracked.item()
    net(torch.randn(4, 3, 5, 5) if x is None else x)
    ran = net[1].num_batches_tracked.item() == before + 1  # only batch statistics count batches
    assert said is ran, f".training said {said}, the module ran in {'train' if ran else 'eval'} mode"
    return "train" if ran else "eval"


@pytest.mark.parametrize(("first", "second"), [("train", "eval"), ("eval", "train")])
def test_the_newest_pin_wins_and_removing_it_restores_the_one_below(first, second):
    net = _net()
    lower = pin_batchnorm(net, first)
    upper = pin_batchnorm(net, second)
    for flip in (net.train, net.eval):
        flip()
        assert _mode(net) == second
    upper.remove()
    for flip in (net.train, net.eval):
        flip()
        assert _mode(net) == first
    lower.remove()
    for flip, expected in ((net.train, "train"), (net.eval, "eval")):
        flip()
        assert _mode(net) == expected  # unpinned: follows the model again


@pytest.mark.parametrize(("first", "second"), [("train", "eval"), ("eval", "train")])
def test_removing_the_lower_pin_keeps_the_upper_one(first, second):
    net = _net()
    lower = pin_batchnorm(net, first)
    upper = pin_batchnorm(net, second)
    lower.remove()
    for flip in (net.train, net.eval):
        flip()
        assert _mode(net) == second
    lower.remove()  # a second removal does nothing
    assert _mode(net) == second
    upper.remove()
    assert _mode(net.eval()) == "eval" and _mode(net.train()) == "train"


@pytest.mark.parametrize("model_mode", ["train", "eval"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_removal_restores_the_mode_the_last_train_or_eval_asked_for(model_mode, mode):
    net = getattr(_net(), model_mode)()
    with pin_batchnorm(net, mode):
        assert _mode(net) == mode
    assert _mode(net) == model_mode  # nothing called train()/eval() meanwhile: the state before the pin
    with pin_batchnorm(net, mode):
        net.train() if model_mode == "eval" else net.eval()
    assert _mode(net) != model_mode  # the call made while pinned counts once the pin is gone


def test_pins_share_one_hook_and_leave_nothing_behind():
    net = _net()
    bn = net[1]
    assert len(bn._forward_pre_hooks) == 0 and "train" not in vars(bn)
    first = pin_batchnorm(net, "eval")
    assert len(bn._forward_pre_hooks) == 1 and "train" in vars(bn)  # control: the count sees the pin's hook
    more = [pin_batchnorm(net, "eval") for _ in range(3)] + [pin_batchnorm(net, "train")]
    assert len(bn._forward_pre_hooks) == 1  # five pins, one hook
    first.remove()
    assert len(bn._forward_pre_hooks) == 1 and _mode(net.eval()) == "train"
    for pin in more:
        pin.remove()
    assert len(bn._forward_pre_hooks) == 0
    assert "train" not in vars(bn) and not any(k.startswith("_inflate") for k in vars(bn))
    assert _mode(net.train()) == "train"


def test_the_guard_of_the_newest_pin_applies():
    net = _net()
    tiny = torch.randn(1, 3, 3, 3)
    with pin_batchnorm(net, "train", small_batch="raise"):
        with pin_batchnorm(net, "train", small_batch="ignore"):
            net(tiny)  # the upper pin ignores small batches
        with pytest.raises(InflateError, match="expected a batch of at least 2 samples"):
            net(tiny)  # control: the lower pin's guard is back


class _BatchNormWithDropout(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a batch norm with submodules of its own."""

    def __init__(self, n):
        super().__init__(n)
        self.drop = nn.Dropout(0.5)


def test_children_of_a_pinned_batch_norm_follow_train_and_eval():
    net = _net(_BatchNormWithDropout)
    with pin_batchnorm(net, "eval"):
        net.train()
        assert not net[1].training and net[1].drop.training  # the norm is pinned, its dropout is not
        net.eval()
        assert not net[1].drop.training


def test_a_copy_keeps_its_pins_when_the_original_is_unpinned():
    net = _net()
    pin = pin_batchnorm(net, "eval")
    clone = copy.deepcopy(net)
    pin.remove()
    assert _mode(net.train()) == "train"
    assert _mode(clone.train()) == "eval" and len(clone[1]._forward_pre_hooks) == 1
    clone_pin = pin_batchnorm(clone, "train")  # the copy's pins stack like any others
    clone_pin.remove()
    assert _mode(clone.train()) == "eval"
