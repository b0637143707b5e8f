"""inflate.lightning.Finetuning on a real lightning.pytorch.Trainer (CPU, tiny model and data).

One uninterrupted run (policy "last", everything unfrozen at epoch 2, a checkpoint after every
epoch) is shared by several tests; the others run their own short fits.
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

import inflate
from inflate import InflateError
from inflate.lightning import Finetuning

STEM, NORM, MIDDLE, HEAD = "net.0.", "net.1.", "net.3.", "net.7."  # inflate.layers: net.0 (+ net.1), net.3, net.7
UNFREEZE = {2: "all"}
EPOCHS = 4


class Net(pl.LightningModule):
    def __init__(self, lr=0.1, weight_decay=0.01, all_params=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.lr, self.weight_decay, self.all_params = lr, weight_decay, all_params

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.all_params:  # the usual mistake: frozen parameters in the optimizer
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.SGD(inflate.param_groups(self, self.lr, weight_decay=self.weight_decay), momentum=0.9)


def loader():
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 8, 8, generator=generator),
                                          torch.randint(0, 3, (24,), generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=8)  # 3 batches an epoch, same order every epoch


class Snapshots(pl.Callback):
    """The model's state (parameters and batch-norm buffers) before training and after each epoch."""

    def __init__(self):
        self.states = {}

    def on_train_start(self, trainer, pl_module):
        self.states.setdefault("start", _state(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.states[trainer.current_epoch] = _state(pl_module)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class LateRestore(SingleDeviceStrategy):
    """Restores callbacks' states after on_fit_start (as DeepSpeed and FSDP do), still before the optimizer's."""

    @property
    def restore_checkpoint_after_setup(self):
        return True


def fit(callbacks, *, model=None, epochs=EPOCHS, ckpt_dir=None, ckpt_path=None, strategy="auto"):
    model = model or Net()
    if ckpt_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1,
                                                 filename="{epoch}", save_on_train_epoch_end=True)]
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1, strategy=strategy,
                         logger=False,
                         enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "module(s) in eval mode at the start of training": the pinned norms
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model


def changed(before, after, prefix):
    """Names under ``prefix`` whose values differ (num_batches_tracked included)."""
    return sorted(k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    snapshots = Snapshots()
    callback = Finetuning("last", unfreeze=UNFREEZE, decay=0.5)
    trainer, model = fit([callback, snapshots], ckpt_dir=ckpt_dir)
    return {"trainer": trainer, "model": model, "states": snapshots.states, "callback": callback,
            "ckpt_dir": ckpt_dir}


# -- freezing and unfreezing --------------------------------------------------------------------


def test_frozen_parameters_and_batch_norm_statistics_stay_put_until_the_unfreeze_epoch(run):
    states = run["states"]
    for epoch in (0, 1):
        for prefix in (STEM, NORM, MIDDLE):
            assert changed(states["start"], states[epoch], prefix) == [], (epoch, prefix)
        assert changed(states["start"], states[epoch], HEAD) == [HEAD + "bias", HEAD + "weight"]
    norm_buffers = [NORM + b for b in ("num_batches_tracked", "running_mean", "running_var")]
    for epoch in (2, 3):  # unfrozen at the start of epoch 2: everything trains, the norm's statistics update
        before = states[epoch - 1]
        # not the stem's bias: the batch norm after it, in train mode, subtracts it again with the batch mean, so
        # its gradient is zero up to rounding and it may or may not move
        assert STEM + "weight" in changed(before, states[epoch], STEM)
        assert changed(before, states[epoch], NORM) == [NORM + "bias", *norm_buffers, NORM + "weight"]
        assert changed(before, states[epoch], MIDDLE) == [MIDDLE + "bias", MIDDLE + "weight"]


def test_negative_control_without_freezing_the_same_run_moves_them():
    snapshots = Snapshots()
    fit([Finetuning("all"), snapshots], epochs=1)
    for prefix in (STEM, NORM, MIDDLE):
        assert changed(snapshots.states["start"], snapshots.states[0], prefix), prefix


def test_batchnorm_train_updates_frozen_statistics_but_not_the_frozen_weights():
    snapshots = Snapshots()
    callback = Finetuning("last", batchnorm="train")
    fit([callback, snapshots], epochs=1)
    assert callback.report.pinned == []
    start, end = snapshots.states["start"], snapshots.states[0]
    assert changed(start, end, NORM) == [NORM + b for b in ("num_batches_tracked", "running_mean", "running_var")]
    assert changed(start, end, STEM) == changed(start, end, MIDDLE) == []


def test_the_unfrozen_layers_join_the_optimizer_in_layer_wise_groups(run):
    optimizer = run["trainer"].optimizers[0]
    names = [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert names == [("net.7", 0.1, 0.01), ("net.7 no_weight_decay", 0.1, 0.0),  # from configure_optimizers
                     ("net.0", 0.025, 0.01), ("net.0 no_weight_decay", 0.025, 0.0),  # lr * 0.5**2
                     ("net.3", 0.05, 0.01), ("net.3 no_weight_decay", 0.05, 0.0)]
    inflate.check_optimizer(run["model"], optimizer)
    assert run["callback"].state_dict() == {"policy": "last", "applied": [[2, "all"]]}
    assert run["callback"].report.pinned == []


# -- resuming -----------------------------------------------------------------------------------


class Probe(pl.Callback):
    """After Finetuning.on_fit_start and before Lightning loads the optimizer's state: what is there."""

    def on_fit_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.groups_at_fit_start = [g["name"] for g in optimizer.param_groups]
        self.state_at_fit_start = len(optimizer.state)
        self.trainable_at_fit_start = all(p.requires_grad for p in pl_module.parameters())

    def on_train_epoch_start(self, trainer, pl_module):
        if not hasattr(self, "momenta"):
            self.momenta = {id(p): optimizer_state["momentum_buffer"].clone()
                            for p, optimizer_state in trainer.optimizers[0].state.items()}
            self.params = list(pl_module.parameters())


@pytest.mark.parametrize("late", [False, True], ids=["restore-before-fit-start", "restore-after-fit-start"])
def test_a_resumed_run_keeps_everything_trainable_with_the_added_groups_and_continues_exactly(run, late):
    ckpt = run["ckpt_dir"] / "epoch=2.ckpt"  # written after the unfreezing at epoch 2
    saved = torch.load(ckpt, weights_only=False)
    assert saved["callbacks"]["Finetuning"] == {"policy": "last", "applied": [[2, "all"]]}
    probe, snapshots = Probe(), Snapshots()
    trainer, model = fit([Finetuning("last", unfreeze=UNFREEZE, decay=0.5), probe, snapshots], model=Net(),
                         ckpt_path=ckpt, strategy=LateRestore(torch.device("cpu")) if late else "auto")
    names = [g["name"] for g in run["trainer"].optimizers[0].param_groups]
    assert probe.state_at_fit_start == 0  # Lightning loads the optimizer's state after on_fit_start
    if not late:  # the callback's state came first: the groups were there at on_fit_start already
        assert probe.groups_at_fit_start == names and probe.trainable_at_fit_start
    else:  # it came after on_fit_start, and was applied then, still before the optimizer's state
        assert probe.groups_at_fit_start == names[:2] and not probe.trainable_at_fit_start
    # and the state came back for every parameter, the added ones included
    saved_momenta = [s["momentum_buffer"] for _, s in sorted(saved["optimizer_states"][0]["state"].items())]
    assert len(saved_momenta) == len(probe.params) == len(probe.momenta)
    order = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert all(torch.equal(probe.momenta[id(p)], m) for p, m in zip(order, saved_momenta))
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == names
    assert all(p.requires_grad for p in model.parameters())
    # training continued, to the same result as the uninterrupted run (same data, same order, CPU)
    resumed, uninterrupted = snapshots.states[3], run["states"][3]
    assert changed(run["states"][2], resumed, "net.") != []
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_negative_control_without_the_callback_state_the_optimizer_state_does_not_fit(run, tmp_path):
    # Lightning's order (callbacks' states, optimizer built, on_fit_start, optimizer state) is what makes the
    # resume work: a checkpoint without the Finetuning state gives an optimizer with the first groups only.
    saved = torch.load(run["ckpt_dir"] / "epoch=2.ckpt", weights_only=False)
    del saved["callbacks"]["Finetuning"]
    torch.save(saved, tmp_path / "stateless.ckpt")
    with pytest.raises(ValueError, match="parameter groups"):
        fit([Finetuning("last", unfreeze=UNFREEZE, decay=0.5)], ckpt_path=tmp_path / "stateless.ckpt")


@pytest.mark.parametrize(("policy", "unfreeze", "message"), [
    ("last", {1: "all"}, "expected the schedule it was saved with"),
    ("first+last", UNFREEZE, "expected the policy it was saved with"),
])
def test_a_checkpoint_from_another_setup_is_refused(run, policy, unfreeze, message):
    with pytest.raises(InflateError, match=message):
        fit([Finetuning(policy, unfreeze=unfreeze)], ckpt_path=run["ckpt_dir"] / "epoch=2.ckpt")


# -- DDP --------------------------------------------------------------------------------------------


class RankGap(pl.Callback):
    """Logs, after each epoch, the largest difference between the two processes' copies of the parameters."""

    def on_train_epoch_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        pl_module.log(f"gap{trainer.current_epoch}", (gathered[0] - gathered[1]).abs().max(), rank_zero_only=True)


def _ddp_gaps(rewrap):
    """Fit on 2 forked processes (ddp_notebook); the gap between their parameters after each epoch."""
    if not rewrap:  # Lightning issue #20340: DDP reduces only the gradients of what trained when it wrapped
        Finetuning._rewrap = lambda self, trainer: None
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=[Finetuning("last", unfreeze=UNFREEZE), RankGap()],
                         accelerator="cpu", devices=2, strategy="ddp_notebook", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), loader())  # the sampler gives each process its own half of the data
    return [trainer.callback_metrics[f"gap{epoch}"].item() for epoch in range(EPOCHS)]


@pytest.mark.parametrize("rewrap", [True, False], ids=["rewrapped", "negative-control"])
def test_under_ddp_the_unfrozen_layers_stay_in_sync_across_processes(rewrap):
    if not torch.distributed.is_available() or "fork" not in torch.multiprocessing.get_all_start_methods():
        pytest.skip("needs torch.distributed and the fork start method (ddp_notebook)")
    # A fresh interpreter: a fork cannot run autograd once the parent's autograd has started threads
    # (after a torch.compile'd model, say), which earlier tests in the same pytest worker may have done.
    code = f"import json, tests.test_lightning as t; print('GAPS', json.dumps(t._ddp_gaps({rewrap})))"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    gaps = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("GAPS "))[5:])
    assert gaps[:2] == [0.0, 0.0]  # before the unfreezing, the layers that train were in DDP's reducer
    if rewrap:
        assert gaps[2:] == [0.0, 0.0]
    else:
        assert min(gaps[2:]) > 1e-4, gaps


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"policy": "most"}, ("policy: expected one of ['last', 'first+last', 'first+second+last', 'all'] or a list "
                          "of positions/names, got 'most'")),
    ({"policy": []}, "policy: expected a policy name or a non-empty list of positions/names, got []"),
    ({"policy": [0, 1.5]}, "policy: expected int positions or str names/patterns, got 1.5"),
    ({"unfreeze": [2]}, "unfreeze: expected an {epoch: policy} mapping or None, got [2]"),
    ({"unfreeze": {-1: "all"}}, "unfreeze: expected epochs as ints >= 0, got [-1]"),
    ({"unfreeze": {2: "everything"}}, "unfreeze at epoch 2: expected one of"),
    ({"batchnorm": True}, "batchnorm: expected one of ('eval', 'train'), got True"),
    ({"decay": 0}, "decay: expected None or a factor in (0, 1], got 0"),
    ({"decay": 1.5}, "decay: expected None or a factor in (0, 1], got 1.5"),
    ({"lr": -1.0}, "lr: expected None or a learning rate > 0, got -1.0"),
    ({"weight_decay": float("nan")}, "weight_decay: expected None or a number >= 0, got nan"),
    ({"example_input": [1, 2]}, "example_input: expected a tensor or None, got list"),
])
def test_arguments_are_checked_at_construction(kwargs, message):
    kwargs = {"policy": "last", **kwargs}
    with pytest.raises(InflateError) as error:
        Finetuning(kwargs.pop("policy"), **kwargs)
    assert str(error.value).startswith(message)


def test_a_policy_that_does_not_fit_the_model_is_refused_at_setup():
    with pytest.raises(InflateError, match=r"policy \[5\]: policy: position 5 is out of range for 3 layers"):
        fit([Finetuning([5])], epochs=1)
    with pytest.raises(InflateError, match="unfreeze|schedule at epoch 1: .*'head' matches no layer"):
        fit([Finetuning("last", unfreeze={1: ["head"]})], epochs=1)


def test_an_optimizer_with_frozen_parameters_is_refused():
    with pytest.raises(InflateError, match=r"expected only trainable parameters, found 6 frozen.*param_groups"):
        fit([Finetuning("last")], model=Net(all_params=True), epochs=1)
