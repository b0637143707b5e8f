"""Layer-wise learning rates and gradual unfreezing, in plain PyTorch training loops."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inflate import InflateError, Unfreezer, check_optimizer, finetune, layers, param_groups

from . import models


def _net():
    return models.conv_bn_stack()


def _names(net, group):
    by_id = {id(p): n for n, p in net.named_parameters()}
    return sorted(by_id[id(p)] for p in group["params"])


def test_each_layer_gets_its_decayed_rate():
    net = _net()
    assert layers(net) == ["0", "3", "6", "8"]
    groups = param_groups(net, 0.1, decay=0.5)
    assert [(g["name"], g["lr"]) for g in groups] == [("0", 0.1 * 0.5**3), ("3", 0.1 * 0.5**2), ("6", 0.1 * 0.5),
                                                      ("8", 0.1)]
    assert _names(net, groups[0]) == ["0.bias", "0.weight", "1.bias", "1.weight"]  # the norm joins its layer
    assert all(g["weight_decay"] == 0.0 for g in groups)
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in net.parameters())  # each parameter exactly once


def test_decay_one_gives_one_rate_and_keeps_the_layers_apart():
    groups = param_groups(_net(), 0.01)
    assert {g["lr"] for g in groups} == {0.01}
    assert [g["name"] for g in groups] == ["0", "3", "6", "8"]  # equal rates, still not merged


def test_frozen_parameters_are_left_out():
    net = _net()
    finetune(net, "first+last")
    groups = param_groups(net, 0.1, decay=0.5)
    assert [g["name"] for g in groups] == ["0", "8"]
    assert [g["lr"] for g in groups] == [0.1 * 0.5**3, 0.1]  # positions count the frozen layers too
    held = {id(p) for g in groups for p in g["params"]}
    assert held == {id(p) for p in net.parameters() if p.requires_grad}
    assert len(held) < len(list(net.parameters()))  # control: some were frozen


def test_biases_and_norm_parameters_get_no_weight_decay():
    net = _net()
    groups = param_groups(net, 0.1, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] == 0.05 for n in _names(net, g)}
    exempt = {n for g in groups if g["weight_decay"] == 0.0 for n in _names(net, g)}
    assert decayed == {"0.weight", "3.weight", "6.weight", "8.weight"}  # conv kernels only
    assert exempt == {"0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "6.bias", "8.bias"}
    assert [g["name"] for g in groups][:2] == ["0", "0 no_weight_decay"]
    # a norm's parameters are exempt even when they are not 1-d (a LayerNorm over two dimensions)
    net = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (2, 2)), nn.LayerNorm([2, 2]))
    assert net[2].weight.ndim == 2
    groups = param_groups(net, 0.1, weight_decay=0.1, example_input=torch.zeros(1, 4))
    assert [(g["name"], g["weight_decay"], _names(net, g)) for g in groups] == [
        ("0", 0.1, ["0.weight"]), ("0 no_weight_decay", 0.0, ["0.bias", "2.bias", "2.weight"])]


def test_parameters_the_forward_pass_never_uses_get_a_group_of_their_own():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _net()
            self.spare = nn.Linear(2, 2)  # registered, never called

        def forward(self, x):
            return self.body(x)

    net = WithSpare()
    groups = param_groups(net, 0.1, decay=0.5)
    assert [(g["name"], g["lr"]) for g in groups][-2:] == [("body.8", 0.1), ("untraced", 0.1)]
    assert _names(net, groups[-1]) == ["spare.bias", "spare.weight"]


@pytest.mark.parametrize("make", [lambda g: torch.optim.AdamW(g), lambda g: torch.optim.SGD(g, momentum=0.9)])
def test_the_groups_work_with_torch_optimizers(make):
    net = _net()
    finetune(net, "first+last")
    optimizer = make(param_groups(net, 0.05, decay=0.1, weight_decay=0.01))
    check_optimizer(net, optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [0.05 * 0.1**3] * 2 + [0.05] * 2
    before = {n: p.clone() for n, p in net.named_parameters()}
    for _ in range(3):
        optimizer.zero_grad()
        net.train()(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    moved = {n for n, p in net.named_parameters() if not torch.equal(before[n], p)}
    trainable = {"0.weight", "0.bias", "1.weight", "1.bias", "8.weight", "8.bias"}
    # 0.bias gets a gradient of (nearly) zero, the norm after it cancels it; Adam may still move it
    assert trainable - {"0.bias"} <= moved <= trainable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0}, r"lr: expected a learning rate > 0, got 0"), ({"lr": "1e-3"}, "lr: expected"),
     ({"lr": 0.1, "decay": 1.5}, r"decay: expected a factor in \(0, 1\], got 1.5"),
     ({"lr": 0.1, "decay": 0}, "decay: expected"), ({"lr": 0.1, "weight_decay": -1}, "weight_decay: expected"),
     ({"lr": float("nan")}, "lr: expected")],
)
def test_arguments_are_checked_at_the_door(kwargs, message):
    with pytest.raises(InflateError, match=message):
        param_groups(_net(), **kwargs)


def test_nothing_trainable_is_refused():
    net = _net().requires_grad_(False)
    with pytest.raises(InflateError, match="expected at least one trainable parameter"):
        param_groups(net, 0.1)


def _fit(net, unfreezer, optimizer, epochs, start=0, snapshots=None):
    torch.manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8), torch.randn(4, 2, 8, 8)) for _ in range(2)]
    for epoch in range(start, epochs):
        unfreezer.step(epoch)
        net.train()
        for x, y in data:
            optimizer.zero_grad()
            F.mse_loss(net(x), y).backward()
            optimizer.step()
        if snapshots is not None:
            snapshots.append({n: p.detach().clone() for n, p in net.named_parameters()})


def _start(schedule=None):
    net = _net()
    finetune(net, "last")
    optimizer = torch.optim.Adam(param_groups(net, 1e-2), lr=1e-2)
    unfreezer = Unfreezer(net, optimizer, schedule or {0: "last", 2: "first+last", 4: "all"}, decay=0.5)
    return net, optimizer, unfreezer


def test_frozen_layers_stay_put_until_their_epoch_then_train():
    net, optimizer, unfreezer = _start()
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    stats = net[1].running_mean.clone()
    snaps = []
    _fit(net, unfreezer, optimizer, 6, snapshots=snaps)

    def moved(epoch, name):
        before = initial if epoch == 0 else snaps[epoch - 1]
        return not torch.equal(before[name], snaps[epoch][name])

    for epoch in range(6):
        assert moved(epoch, "8.weight")  # the head always trains
        assert moved(epoch, "0.weight") is (epoch >= 2), epoch
        assert moved(epoch, "3.weight") is (epoch >= 4), epoch
    assert unfreezer.applied == [0, 2, 4]
    assert not torch.equal(net[1].running_mean, stats)  # unfrozen at 2: its batch norm learns statistics
    check_optimizer(net, optimizer)
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["8", "0", "3", "6"]  # each parameter added once, in the epoch it thawed
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-2 * 0.5**3, 1e-2 * 0.5**2, 1e-2 * 0.5]


def test_frozen_batch_norms_keep_their_statistics_until_unfrozen():
    net, optimizer, unfreezer = _start()
    stats = net[4].running_mean.clone(), net[4].num_batches_tracked.clone()
    _fit(net, unfreezer, optimizer, 4)
    assert torch.equal(net[4].running_mean, stats[0]) and torch.equal(net[4].num_batches_tracked, stats[1])
    _fit(net, unfreezer, optimizer, 5, start=4)
    assert not torch.equal(net[4].running_mean, stats[0])  # control: after "all" at 4 it updates


def test_the_optimizer_state_of_trained_parameters_survives_the_unfreezing():
    net, optimizer, unfreezer = _start()
    _fit(net, unfreezer, optimizer, 2)
    head = net[8].weight
    moments = {k: v.clone() for k, v in optimizer.state[head].items()}
    group = optimizer.param_groups[0]
    assert unfreezer.step(2) is not None and unfreezer.step(2) is None  # idempotent for the same epoch
    assert unfreezer.step(1) is None  # and never goes back
    assert optimizer.param_groups[0] is group and len(optimizer.param_groups) == 2
    assert all(torch.equal(optimizer.state[head][k], v) for k, v in moments.items())  # Adam's exp_avg & co
    assert net[0].weight not in optimizer.state  # new parameters start fresh
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held})  # nothing twice


def test_an_optimizer_over_everything_gets_nothing_added():
    net = _net()
    finetune(net, "last")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    Unfreezer(net, optimizer, {0: "last", 1: "all"}).step(1)
    assert len(optimizer.param_groups) == 1 and all(p.requires_grad for p in net.parameters())


def test_a_resumed_run_continues_exactly_and_does_not_refreeze():
    net, optimizer, unfreezer = _start()
    _fit(net, unfreezer, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "unfreezer": unfreezer.state_dict()},
               buffer)
    _fit(net, unfreezer, optimizer, 5, start=3)
    straight = {n: p.detach().clone() for n, p in net.named_parameters()}

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    net, optimizer, unfreezer = _start()  # a fresh process: as at the start
    net.load_state_dict(saved["model"])
    unfreezer.load_state_dict(saved["unfreezer"])  # before the optimizer's state, which expects the groups
    optimizer.load_state_dict(saved["optimizer"])
    assert net[0].weight.requires_grad and not net[3].weight.requires_grad  # unfrozen at 2, stays so
    assert unfreezer.step(3) is None
    assert net[0].weight.requires_grad  # control for the claim: stepping epoch 3 does not re-freeze layer 0
    _fit(net, unfreezer, optimizer, 5, start=3)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p, straight[n], rtol=0, atol=0)


def test_a_state_from_another_schedule_is_refused():
    net, optimizer, unfreezer = _start()
    unfreezer.step(2)
    state = unfreezer.state_dict()
    assert state == {"applied": [[0, "last"], [2, "first+last"]]}
    _, _, other = _start({0: "last", 2: "all"})
    with pytest.raises(InflateError, match=r"expected the schedule it was saved with, got 'all' at epoch 2"):
        other.load_state_dict(state)
    _, _, ahead = _start()
    ahead.step(4)
    with pytest.raises(InflateError, match=r"expected a continuation of the epochs applied here \(\[0, 2, 4\]\)"):
        ahead.load_state_dict(state)


@pytest.mark.parametrize(
    ("schedule", "kwargs", "message"),
    [({}, {}, "schedule: expected a non-empty"), ({-1: "last"}, {}, r"expected epochs as ints >= 0, got \[-1\]"),
     ({0: "last", 3: "head"}, {}, r"schedule at epoch 3: policy: expected one of"),
     ({0: [9]}, {}, "schedule at epoch 0: policy: position 9 is out of range for 4 layers"),
     ({0: "last"}, {"decay": 2}, "decay: expected"), ({0: "last"}, {"freeze_batchnorm": 1}, "freeze_batchnorm")],
)
def test_unfreezer_arguments_are_checked_before_anything_changes(schedule, kwargs, message):
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(InflateError, match=message):
        Unfreezer(net, optimizer, schedule, **kwargs)
    assert all(p.requires_grad for p in net.parameters()) and len(optimizer.param_groups) == 1
    with pytest.raises(InflateError, match=r"epoch: expected an int >= 0, got -1"):
        Unfreezer(net, optimizer, {0: "last"}).step(-1)
