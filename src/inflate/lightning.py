"""Fine-tuning in Lightning: one callback that freezes, pins, unfreezes and resumes correctly.

:class:`Finetuning` puts :func:`inflate.finetune`, :func:`inflate.param_groups` and
:class:`inflate.Unfreezer` on a :class:`lightning.pytorch.Trainer`. It needs
``lightning>=2.2`` (``pip install "torch-inflate[lightning]"``); ``import inflate``
does not import Lightning, this module does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
except ImportError as _error:  # pragma: no cover - exercised only without lightning
    raise ImportError("inflate.lightning: expected lightning>=2.2 to be installed "
                      "(pip install 'torch-inflate[lightning]'), got an ImportError: " + str(_error)) from _error
from torch.nn.parallel import DistributedDataParallel

from ._errors import InflateError
from ._finetune import POLICIES, FinetuneReport, Policy, check_optimizer, finetune
from ._schedule import Unfreezer, _number, _plain

__all__ = ["Finetuning"]

_BATCHNORM = ("eval", "train")


def _check_policy(name: str, policy: Any) -> Policy:
    """What :func:`finetune` accepts, checked without a model (positions and names are checked at setup)."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise InflateError(f"{name}: expected one of {list(POLICIES)} or a list of positions/names, "
                               f"got {policy!r}")
        return policy
    if not isinstance(policy, Sequence) or not policy:
        raise InflateError(f"{name}: expected a policy name or a non-empty list of positions/names, got {policy!r}")
    bad = [e for e in policy if isinstance(e, bool) or not isinstance(e, (int, str))]
    if bad:
        raise InflateError(f"{name}: expected int positions or str names/patterns, got {bad[0]!r}")
    return list(policy)


class Finetuning(pl.Callback):
    """A Lightning callback for fine-tuning: a policy, gradual unfreezing, pinned batch norms, exact resuming.

    **Fit start.** In the ``setup`` hook of ``fit``, before the strategy wraps the model
    and before ``configure_optimizers`` runs, ``policy`` is applied with
    :func:`inflate.finetune`: only its layers stay trainable. Build the optimizer from the
    trainable parameters, for instance ``AdamW(inflate.param_groups(self, lr, decay=...))``;
    at ``on_fit_start`` the callback checks it with :func:`inflate.check_optimizer` (a frozen
    or missing parameter raises).

    **Batch norms.** ``batchnorm="eval"`` pins every batch norm whose parameters are all
    frozen to eval mode, through Lightning's ``model.train()`` calls: its running
    statistics stay the pretrained ones until its layer is unfrozen (Lightning's
    ``BaseFinetuning.freeze(train_bn=False)`` sets ``eval()`` once, and the next
    ``train()`` undoes it, issue #13902). ``batchnorm="train"`` pins none: frozen batch
    norms follow ``train()``/``eval()``, normalize training batches with batch statistics
    and update their running statistics, while their weight and bias stay frozen
    (``train_bn=True``). Trainable batch norms follow ``train()``/``eval()`` in both cases.
    Lightning's warning that modules are "in eval mode at the start of training" names the
    pinned ones.

    **Unfreezing.** As each training epoch starts, the entries of ``unfreeze`` due by
    ``trainer.current_epoch`` are applied with :class:`inflate.Unfreezer` on
    ``trainer.optimizers[0]``: the parameters that became trainable are added to it with
    ``add_param_group``, in layer-wise groups (:func:`inflate.param_groups` with ``lr``,
    ``decay`` and ``weight_decay``); its existing groups and their state are untouched. An
    entry whose epoch has passed is applied at the next epoch start, so a ``fit`` that
    starts late catches up.

    **Checkpoints.** The callback's state (the policy and the entries applied) is saved in
    the checkpoint. ``trainer.fit(model, ckpt_path=...)`` restores callbacks' states before
    it creates the optimizer, and loads the optimizer's state after ``on_fit_start``;
    in ``on_fit_start`` the callback applies the saved entries again, so the layers
    unfrozen before the interruption stay trainable (nothing is frozen again, unlike
    Lightning issue #21901) and the optimizer gets the same groups, in the same order,
    before Lightning loads its state into them (issue #6891). With a strategy that restores
    callbacks after ``on_fit_start``, the entries are applied when the state is loaded,
    which is still before the optimizer's state.

    **DDP.** ``DistributedDataParallel`` reduces the gradients only of the parameters
    that required grad when it wrapped the model; a layer unfrozen later would train on
    each process's own gradients and the copies would drift apart (Lightning issue
    #20340). Under a DDP strategy the callback therefore wraps the model again whenever the
    set of trainable parameters changes (every process unfreezes at the same epoch start).
    DeepSpeed and other sharded strategies are refused.

    Args:
        policy: the layers trainable from the start, as :func:`inflate.finetune` takes it:
            ``"last"``, ``"first+last"``, ``"first+second+last"``, ``"all"``, or a list of
            positions in :func:`inflate.layers` and layer names or patterns.
        unfreeze: ``{epoch: policy}``: from that epoch (0-based), that policy applies. Each
            policy names all the layers that train from then on. ``None`` or ``{}``: no
            unfreezing.
        batchnorm: ``"eval"`` or ``"train"``, what the frozen batch norms do (see above).
        decay: the layer-wise rate factor in ``(0, 1]`` for the groups added when
            unfreezing (:func:`inflate.param_groups`); ``None`` gives them all ``lr``.
        lr: the rate of the last layer in the groups added. Default: the largest initial
            rate among the optimizer's groups at fit start (``initial_lr`` where a
            scheduler set one), which is the ``lr`` given to :func:`inflate.param_groups`,
            or the one rate of a single-group optimizer. (The optimizer's ``defaults``
            are not used: an optimizer built from groups keeps torch's default there.)
        weight_decay: the weight decay of the weights added. Default: the largest weight
            decay among the optimizer's groups at fit start.
        example_input: a tensor the model accepts, for tracing the layers; only its shape
            and dtype are used. Default: the module's ``example_input_array`` if it is a
            tensor, else the input that :func:`inflate.layers` infers.

    Attributes:
        report: the :class:`inflate.FinetuneReport` of the policy applied last, or None
            before ``fit``.

    Raises:
        InflateError: at construction, an argument of the wrong kind or out of range; at
            setup, a policy that does not fit the model, an unsupported strategy or a
            second ``Finetuning`` callback; at fit start, a single optimizer that holds frozen
            parameters or misses trainable ones, or not exactly one optimizer with ``unfreeze``;
            on resuming, a checkpoint saved with another policy or schedule.

    Example:
        >>> import torch, torch.nn as nn, lightning.pytorch as pl
        >>> import inflate
        >>> from inflate.lightning import Finetuning
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         return nn.functional.cross_entropy(self(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(inflate.param_groups(self, 0.1), momentum=0.9)
        >>> _ = torch.manual_seed(0)
        >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,)))
        >>> callback = Finetuning("last", unfreeze={1: "all"}, decay=0.5)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> model = Net()
        >>> trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
        >>> [(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups]
        [('net.5', 0.1), ('net.0', 0.05)]
        >>> callback.state_dict()
        {'policy': 'last', 'applied': [[1, 'all']]}
        >>> Finetuning("last", batchnorm="frozen")
        Traceback (most recent call last):
        ...
        inflate._errors.InflateError: batchnorm: expected one of ('eval', 'train'), got 'frozen'
    """

    def __init__(self, policy: Policy, *, unfreeze: Mapping[int, Policy] | None = None, batchnorm: str = "eval",
                 decay: float | None = None, lr: float | None = None, weight_decay: float | None = None,
                 example_input: Tensor | None = None) -> None:
        self.policy = _check_policy("policy", policy)
        if unfreeze is None:
            unfreeze = {}
        if not isinstance(unfreeze, Mapping):
            raise InflateError(f"unfreeze: expected an {{epoch: policy}} mapping or None, got {unfreeze!r}")
        bad = [k for k in unfreeze if not isinstance(k, int) or isinstance(k, bool) or k < 0]
        if bad:
            raise InflateError(f"unfreeze: expected epochs as ints >= 0, got {bad}")
        self.unfreeze = {k: _check_policy(f"unfreeze at epoch {k}", unfreeze[k]) for k in sorted(unfreeze)}
        if batchnorm not in _BATCHNORM:
            raise InflateError(f"batchnorm: expected one of {_BATCHNORM}, got {batchnorm!r}")
        self.batchnorm = batchnorm
        self.decay = None if decay is None else _number("decay", decay, low=0.0, high=1.0, low_open=True,
                                                        expected="None or a factor in (0, 1]")
        self.lr = None if lr is None else _number("lr", lr, low=0.0, low_open=True,
                                                  expected="None or a learning rate > 0")
        self.weight_decay = None if weight_decay is None else _number("weight_decay", weight_decay, low=0.0,
                                                                      expected="None or a number >= 0")
        if example_input is not None and not isinstance(example_input, Tensor):
            raise InflateError(f"example_input: expected a tensor or None, got {type(example_input).__name__}")
        self.example_input = example_input
        self.report: FinetuneReport | None = None
        self._unfreezer: Unfreezer | None = None
        self._saved: dict[str, Any] | None = None  # a loaded state waiting for the optimizer (on_fit_start)
        self._trainer: pl.Trainer | None = None
        self._fit_started = False  # on_fit_start has run in this fit: a loaded state is applied at once

    def __repr__(self) -> str:
        return (f"Finetuning({self.policy!r}, unfreeze={self.unfreeze!r}, batchnorm={self.batchnorm!r}, "
                f"decay={self.decay!r}, lr={self.lr!r}, weight_decay={self.weight_decay!r})")

    # -- hooks -------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy and apply ``policy``, before the model is wrapped and the optimizer built."""
        if stage != "fit":
            return
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise InflateError(f"strategy: expected a single-device or DDP strategy, got {type(strategy).__name__}")
        mine = [c for c in trainer.callbacks if isinstance(c, Finetuning)]
        if len(mine) > 1:
            raise InflateError(f"callbacks: expected one Finetuning callback, got {len(mine)}: {mine}")
        self._trainer = trainer
        self._unfreezer = None
        self._fit_started = False
        self._apply_policy(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizer, build the unfreezer on it, and apply a loaded state before its state is loaded."""
        # Again: a strategy may have replaced batch norms since setup (sync_batchnorm=True converts them to
        # SyncBatchNorm), and the new modules carry no pins yet. The trainable set is the same as at setup.
        self._apply_policy(pl_module)
        optimizers = trainer.optimizers
        if self.unfreeze and len(optimizers) != 1:
            raise InflateError(f"optimizers: expected one, to add the unfrozen parameters to, got {len(optimizers)}")
        if len(optimizers) == 1:  # several (a GAN's) each hold a part of the model: nothing to compare with
            try:
                check_optimizer(pl_module, optimizers[0])
            except InflateError as error:
                raise InflateError(f"{error}; build the optimizer in configure_optimizers from the parameters "
                                   f"trainable under the policy {self.policy!r}, e.g. inflate.param_groups(self, lr)"
                                   ) from error
        if self.unfreeze:
            optimizer = optimizers[0]
            groups = optimizer.param_groups
            lr = self.lr if self.lr is not None else max(g.get("initial_lr", g["lr"]) for g in groups)
            weight_decay = (self.weight_decay if self.weight_decay is not None
                            else max(g.get("weight_decay", 0.0) for g in groups))
            self._unfreezer = Unfreezer(pl_module, optimizer, self.unfreeze, lr=lr, decay=self.decay or 1.0,
                                        weight_decay=weight_decay, example_input=self._example(pl_module),
                                        freeze_batchnorm=self.batchnorm == "eval")
        self._fit_started = True
        if self._saved is not None:
            self._restore(self._saved)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the entries of ``unfreeze`` due by ``trainer.current_epoch``."""
        if self._unfreezer is None:
            return
        report = self._unfreezer.step(trainer.current_epoch)
        if report is not None:
            self.report = report
            self._rewrap(trainer)

    def state_dict(self) -> dict[str, Any]:
        """``{"policy": ..., "applied": [[epoch, policy], ...]}``, in plain lists and strings; Lightning saves it."""
        if self._unfreezer is not None:
            applied = self._unfreezer.state_dict()["applied"]
        else:
            applied = self._saved["applied"] if self._saved is not None else []
        return {"policy": _plain(self.policy), "applied": applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state of a checkpoint; it is applied in ``on_fit_start``, or now if that has run.

        Raises:
            InflateError: the state is malformed or was saved with another policy.
        """
        if not isinstance(state_dict, Mapping) or "policy" not in state_dict or "applied" not in state_dict:
            raise InflateError(f"state: expected {{'policy': ..., 'applied': [[epoch, policy], ...]}}, "
                               f"got {state_dict!r}")
        if state_dict["policy"] != _plain(self.policy):
            raise InflateError(f"state: expected the policy it was saved with, got {self.policy!r} where it was "
                               f"saved with {state_dict['policy']!r}")
        self._saved = {"policy": state_dict["policy"], "applied": list(state_dict["applied"])}
        if self._fit_started:  # a strategy that restores callbacks after on_fit_start
            self._restore(self._saved)

    # -- internals ---------------------------------------------------------------------

    def _example(self, pl_module: pl.LightningModule) -> Tensor | None:
        if self.example_input is not None:
            return self.example_input
        example = getattr(pl_module, "example_input_array", None)
        return example if isinstance(example, Tensor) else None

    def _apply_policy(self, pl_module: pl.LightningModule) -> None:
        try:
            self.report = finetune(pl_module, self.policy, example_input=self._example(pl_module),
                                   freeze_batchnorm=self.batchnorm == "eval")
        except InflateError as error:
            raise InflateError(f"policy {self.policy!r}: {error}") from error

    def _restore(self, state: dict[str, Any]) -> None:
        if state["applied"] and self._unfreezer is None:
            raise InflateError(f"state: expected the schedule it was saved with, got no unfreeze where it applied "
                               f"{state['applied']}")
        if self._unfreezer is not None:
            before = len(self._unfreezer.applied)
            self._unfreezer.load_state_dict(state)
            if len(self._unfreezer.applied) > before:
                self._rewrap(self._trainer)
        self._saved = None

    def _rewrap(self, trainer: pl.Trainer | None) -> None:
        """Wrap the model in a new DistributedDataParallel, whose reducer includes the parameters unfrozen."""
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.model.module
            strategy.configure_ddp()
