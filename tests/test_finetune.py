"""Layer listing, fine-tuning policies, and frozen parameters that really stay frozen."""

import copy

import pytest
import torch
from torch import nn

from inflate import InflateError, check_optimizer, finetune, inflate_first_conv, layers, pin_batchnorm

from . import models

timm = pytest.importorskip("timm")


def _net():
    return models.conv_bn_stack()


def test_layers_are_in_forward_order_with_norms_attached():
    class Reordered(nn.Module):  # registration order differs from execution order
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.norm = nn.LayerNorm(4)
            self.stem = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(self.norm(self.stem(x)))

    assert layers(Reordered(), torch.zeros(2, 3)) == ["stem", "head"]
    assert layers(_net()) == ["0", "3", "6", "8"]


def test_a_norm_before_the_first_weight_layer_joins_it_once():
    from inflate._finetune import trace_layers

    units = trace_layers(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert [(u.name, u.norms, sorted(u.params)) for u in units] == [
        ("1", ["0", "2"], ["0.bias", "0.weight", "1.bias", "1.weight", "2.bias", "2.weight"])]


def test_timm_layers_and_params_are_all_covered():
    from inflate._finetune import trace_layers

    model = timm.create_model("resnet18")
    units = trace_layers(model)
    assert [u.name for u in units][:2] == ["conv1", "layer1.0.conv1"] and units[0].norms == ["bn1"]
    assert units[-1].name == "fc"
    assert sorted(p for u in units for p in u.params) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("policy", "trainable"),
    [
        ("last", {"8"}),
        ("first+last", {"0", "1", "8"}),
        ("first+second+last", {"0", "1", "3", "4", "8"}),
        ("all", {"0", "1", "3", "4", "6", "8"}),
        ([1, -2], {"3", "4", "6"}),
        (["6"], {"6"}),
        ([r"[36]"], {"3", "4", "6"}),
    ],
)
def test_policies(policy, trainable):
    net = _net()
    report = finetune(net, policy)
    assert {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad} == trainable
    assert report.trainable == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert f"({report.share:.2%})" in str(report)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("head", r"policy: expected one of \['last', 'first\+last', 'first\+second\+last', 'all'\]"),
        ([7], r"position 7 is out of range for 4 layers"),
        (["nope.*"], r"'nope\.\*' matches no layer; layers are \['0', '3', '6', '8'\]"),
        ([], r"expected at least one trainable layer"),
        ([1.5], r"expected int positions or str names/patterns, got 1.5"),
    ],
)
def test_policy_mistakes_are_explained(policy, message):
    net = _net()
    with pytest.raises(InflateError, match=message):
        finetune(net, policy)
    assert all(p.requires_grad for p in net.parameters())  # nothing changed


def test_frozen_tensors_stay_byte_identical_under_sgd_with_momentum_and_weight_decay():
    net = _net()
    net(torch.randn(4, 3, 8, 8)).sum().backward()  # stale grads everywhere, as after a previous phase
    finetune(net, "last")  # pins the frozen batch norms to eval mode too
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("8.")}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=0.01)
    check_optimizer(net, opt)
    for _ in range(5):
        opt.zero_grad()
        net.train()(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("8."))
    now = net.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())  # incl. BN running stats
    assert not torch.equal(now["8.weight"], _net().state_dict()["8.weight"])  # control: the head moved


def test_all_policy_on_an_sgd_optimizer_over_everything_moves_everything():
    net = _net()
    finetune(net, "all")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    check_optimizer(net, opt)
    before = copy.deepcopy(net.state_dict())
    opt.zero_grad()
    net(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert all(p.grad is not None for p in net.parameters())
    # the conv biases right before a batch norm get an exactly zero gradient (the norm cancels them)
    moved = {n for n, p in net.named_parameters() if not torch.equal(before[n], p)}
    assert moved >= {n for n, _ in net.named_parameters()} - {"0.bias", "3.bias"}


def test_check_optimizer_catches_the_classic_mistakes():
    net = _net()
    finetune(net, "last")
    with pytest.raises(InflateError, match=r"found 10 frozen: \['0.weight', '0.bias'"):
        check_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    finetune(net, "first+last")
    with pytest.raises(InflateError, match=r"4 missing: \['0.weight', '0.bias', '1.weight', '1.bias'\]"):
        check_optimizer(net, torch.optim.SGD(net[8].parameters(), lr=0.1))
    finetune(net, "all")
    stale = torch.optim.SGD(net.parameters(), lr=0.1)
    inflate_first_conv(net, 2)
    with pytest.raises(InflateError, match="built before inflate_first_conv"):
        check_optimizer(net, stale)


def test_finetune_on_a_vit_treats_loose_parameters_as_layers():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=2)
    x = torch.zeros(1, 3, 32, 32)
    names = layers(model, x)
    assert names[:3] == ["patch_embed.proj", "cls_token", "pos_embed"] and names[-1] == "head"
    report = finetune(model, "first+last", example_input=x)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias"}  # the final norm
    # runs before the head, so it belongs to the last block's fc2, the weight layer before it
    assert "patch_embed.proj" in str(report)


def _bn_state(bn):
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("freeze_batchnorm", [True, False])
@pytest.mark.parametrize(("policy", "frozen"), [("last", ["1", "4"]), ("first+last", ["4"])])  # 1 trains with 0
def test_frozen_batch_norms_keep_their_running_statistics_in_train_mode(policy, frozen, freeze_batchnorm):
    net = _net().train()
    report = finetune(net, policy, freeze_batchnorm=freeze_batchnorm)
    before = {i: _bn_state(net[i]) for i in (1, 4)}
    net.train()(torch.randn(4, 3, 8, 8))
    assert net.training and net[0].training
    for i in (1, 4):
        name, moved = str(i), not _same(_bn_state(net[i]), before[i])
        if name not in frozen:
            assert moved and net[i].training  # a trainable batch norm still learns its statistics
        elif freeze_batchnorm:
            assert not moved and not net[i].training  # running_mean, running_var, num_batches_tracked kept
        else:  # control: opted out, the statistics move although the norm's parameters are frozen
            assert moved and net[i].training and not any(p.requires_grad for p in net[i].parameters())
    assert report.pinned == (frozen if freeze_batchnorm else [])


def _finetune_pins(bn):
    stack = vars(bn).get("_inflate_pins")
    return [p for p in stack.pins if p.owner == "finetune"] if stack is not None else []


def test_finetune_pins_are_replaced_not_piled_up():
    net = _net()
    first = finetune(net, "last")
    assert first.pinned == ["1", "4"] and "frozen batch norms pinned to eval: 2" in str(first)
    second = finetune(net, "last")
    assert [len(_finetune_pins(net[i])) for i in (1, 4)] == [1, 1]  # one pin each, not two
    assert len(net[1]._forward_pre_hooks) == 1
    first.pin.remove()  # the handle of the replaced pins does nothing any more
    assert not net.train()[1].training
    finetune(net, "first+last")
    assert _finetune_pins(net[1]) == [] and net.train()[1].training  # 1 trains now: unpinned
    assert len(_finetune_pins(net[4])) == 1 and not net[4].training
    report = finetune(net, "all")
    assert report.pinned == [] and "pinned" not in str(report)
    assert all(_finetune_pins(net[i]) == [] for i in (1, 4))
    assert all("_inflate_pins" not in vars(net[i]) and not net[i]._forward_pre_hooks for i in (1, 4))
    assert net.train()[4].training and not net.eval()[4].training  # follows the model again
    second.pin.remove()  # removing an old handle after everything is gone is harmless


def test_finetune_pins_leave_the_users_pins_alone():
    net = _net()
    user = pin_batchnorm(net, "train", small_batch="ignore")
    report = finetune(net, "last")
    assert net.eval()[4].training is False  # finetune's pin is the newest
    top = pin_batchnorm(net, "train", small_batch="ignore")
    finetune(net, "last")  # replaced in place: the user's pin on top still applies
    assert net.eval()[4].training
    top.remove()
    report.pin.remove()  # an old handle: nothing
    assert not net[4].training
    finetune(net, "all")  # finetune's pin goes, the user's first one is back
    assert net.eval()[4].training
    user.remove()
    assert not net.eval()[4].training


def test_finetune_report_pin_can_be_removed():
    net = _net().train()
    report = finetune(net, "last")
    report.pin.remove()
    assert net[4].training and net[1].training
    before = _bn_state(net[4])
    net(torch.randn(4, 3, 8, 8))
    assert not _same(_bn_state(net[4]), before)


def test_freeze_batchnorm_is_checked_at_the_door():
    net = _net()
    with pytest.raises(InflateError, match="freeze_batchnorm: expected True or False, got 'yes'"):
        finetune(net, "last", freeze_batchnorm="yes")
    assert all(p.requires_grad for p in net.parameters()) and "_inflate_pins" not in vars(net[1])
