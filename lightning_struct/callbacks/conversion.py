r"""
StructuredConversion
^^^^^^^^^^^^^^^^^^^^

Train dense, convert selected layers to low-rank / ACDC / tied form at a chosen epoch,
fine-tune the converted model in the same ``fit``, and keep every later checkpoint reloadable.

The story, hook by hook:

* ``setup``: refuse strategies that cannot be re-wrapped (see below); install a pre-load hook on the
  LightningModule so a checkpoint of a converted model rebuilds its structure before the
  weights load (Lightning calls ``LightningModule.on_load_checkpoint`` *before*
  ``load_state_dict`` but the callbacks' ``on_load_checkpoint`` *after*, so the callback hook
  would be too late).
* ``on_train_epoch_start`` of epoch ``at_epoch``: take ``calibration_batches`` training batches,
  :func:`lightning_struct.surgery.convert` the selected layers, re-create the optimizers and LR
  schedulers through ``trainer.strategy.setup_optimizers(trainer)`` (the same call the strategy
  makes at fit start; it runs ``configure_optimizers`` on the new parameters), scale the LRs by
  ``lr_scale`` and (default) fast-forward the new schedulers to the current epoch/step. Log the
  report (scalars, and a W&B table when a ``WandbLogger`` is attached).
* ``on_save_checkpoint``: write the conversion spec under ``checkpoint["lightning_struct_conversion"]``.
* ``state_dict``/``load_state_dict``: whether the conversion already happened (a resumed run
  does not convert twice).

Under DDP (``strategy="ddp"``, the subprocess launcher; gloo or NCCL). DDP registers its gradient
hooks (the reducer) on the parameters that exist when the model is wrapped, so the conversion goes:
rank 0 plans and converts from its own calibration batches; the plan (the spec entries) is
broadcast and every other rank builds the same structure; every parameter and buffer is then
broadcast from rank 0, so all ranks start the fine-tuning bit-identical (nothing relies on the
ranks' SVDs agreeing to the last bit); the module is unwrapped and wrapped in a fresh
``DistributedDataParallel`` through the strategy (SyncBatchNorm, precision plugin, DDP kwargs and
comm hooks as at fit start); the optimizers and schedulers are re-created and moved to the device.

Refused at fit start: ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook`` (the main process would
receive rank 0's final weights through a *non-strict* ``load_state_dict`` into its own unconverted
copy of the model, silently keeping the dense weights) and sharded strategies (FSDP, DeepSpeed:
their shards are built on the modules that exist when they wrap). For those, use the two-phase
form (:func:`lightning_struct.callbacks.two_phase.fit_convert_finetune`, or a ``conversion:``
section in ``lightning-struct train``), where the second ``fit`` wraps the already converted model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_struct._checks import check_choice, check_int
from lightning_struct.callbacks._batches import take_batches, train_loader_of
from lightning_struct.callbacks._log import log_scalars, log_table
from lightning_struct.callbacks._structure import announce_structure_change
from lightning_struct.surgery import (
    SPEC_KEY,
    ConversionOptions,
    ConversionReport,
    apply_entries,
    convert,
    get_spec,
    restore_structure,
    select_candidates,
)

log = logging.getLogger(__name__)

__all__ = ["ConversionCheckpoint", "StructuredConversion", "scale_learning_rates"]

_HOOK_FLAG = "_lightning_struct_preload"


def _cannot_rewrap(strategy: Any) -> str | None:
    """Why the model cannot be converted inside a fit under ``strategy`` (``None``: it can)."""
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, ParallelStrategy):
        return None
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover - older Lightning
        DeepSpeedStrategy = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy):
        if getattr(strategy, "_start_method", "popen") != "popen":
            return (
                f"with start method {strategy._start_method!r} (ddp_spawn / ddp_fork / ddp_notebook) the main "
                "process receives rank 0's weights through a non-strict load into its own unconverted model and "
                "silently keeps the dense weights"
            )
        return None
    return "a sharded or custom strategy builds its parameter shards on the modules that exist when it wraps the model"


def _broadcast_module_state(module: torch.nn.Module) -> None:
    """Every parameter and buffer of ``module`` takes rank 0's value (same structure on every rank)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def _rewrap_ddp(trainer: pl.Trainer) -> None:
    """A fresh ``DistributedDataParallel`` around the converted module, as ``DDPStrategy.setup`` builds it.

    The old wrapper's reducer holds the dense parameters (it would never all-reduce the factors),
    so the module is unwrapped and wrapped again through the strategy: SyncBatchNorm conversion,
    the precision plugin's module conversion, the move to the device, the DDP kwargs and the
    communication hooks are those the strategy applies at fit start.
    """
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if not isinstance(strategy.model, DistributedDataParallel):
        return
    strategy.model = strategy.lightning_module
    layer_sync = getattr(strategy, "_layer_sync", None)
    if layer_sync is not None:
        strategy.model = layer_sync.apply(strategy.model)
    strategy.precision_plugin.convert_module(strategy.model)
    strategy.model_to_device()
    strategy.configure_ddp()  # type: ignore[attr-defined]


def _install_preload_hook(pl_module: pl.LightningModule) -> None:
    """Make ``pl_module.on_load_checkpoint`` rebuild the converted structure first."""
    current = pl_module.on_load_checkpoint
    if getattr(current, _HOOK_FLAG, False):
        return

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        restore_structure(pl_module, checkpoint)
        current(checkpoint)

    setattr(on_load_checkpoint, _HOOK_FLAG, True)
    pl_module.__dict__["on_load_checkpoint"] = on_load_checkpoint


def _remove_preload_hook(pl_module: pl.LightningModule) -> None:
    fn = pl_module.__dict__.get("on_load_checkpoint")
    if fn is not None and getattr(fn, _HOOK_FLAG, False):
        del pl_module.__dict__["on_load_checkpoint"]


def scale_learning_rates(trainer: pl.Trainer, scale: float) -> None:
    """Multiply every optimizer group's LR (and ``initial_lr``) and every scheduler's ``base_lrs``."""
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * scale
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * scale
    for cfg in trainer.lr_scheduler_configs:
        sched = cfg.scheduler
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [b * scale for b in sched.base_lrs]  # type: ignore[attr-defined]
        if hasattr(sched, "_last_lr"):
            sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]  # type: ignore[attr-defined]


def _fast_forward_schedulers(trainer: pl.Trainer) -> None:
    """Step freshly created schedulers to where the run is (epoch or step interval)."""
    for cfg in trainer.lr_scheduler_configs:
        if isinstance(cfg.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            continue
        n = trainer.current_epoch if cfg.interval == "epoch" else trainer.global_step
        n = n // max(1, int(cfg.frequency))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(n):
                cfg.scheduler.step()  # type: ignore[call-arg]


def _restart_checkpoint_ranking(trainer: pl.Trainer) -> None:
    """Forget the top-k scores of monitoring ModelCheckpoints (their state as at construction)."""
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or cb.monitor is None:
            continue
        cb.best_k_models = {}
        cb.kth_best_model_path = ""
        cb.best_model_score = None
        cb.best_model_path = ""
        cb.current_score = None
        cb.kth_value = torch.tensor(torch.inf if cb.mode == "min" else -torch.inf)


class ConversionCheckpoint(Callback):
    """Keep a converted model's checkpoints reloadable (and optionally scale the LR).

    Used by the two-phase form for the fine-tuning ``fit`` (the model is converted before the
    Trainer sees it), and the base of :class:`StructuredConversion`:

    * every checkpoint gets the model's conversion spec (``checkpoint["lightning_struct_conversion"]``);
    * ``fit/validate/test(ckpt_path=...)`` on a *dense* model rebuilds the structure before the
      state dict loads;
    * ``lr_scale`` multiplies the LRs created by ``configure_optimizers`` at fit start (a resumed
      run restores the already-scaled optimizer state instead).

    Works under every strategy (it never changes the structure during a ``fit``).

    Args:
        lr_scale: factor for the learning rates of this fit (``None``: unchanged).
    """

    def __init__(self, lr_scale: float | None = None) -> None:
        if lr_scale is not None and not (isinstance(lr_scale, (int, float)) and lr_scale > 0):
            raise ValueError(f"lr_scale={lr_scale!r} must be a positive number or None")
        self.lr_scale = None if lr_scale is None else float(lr_scale)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _install_preload_hook(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _remove_preload_hook(pl_module)

    def _apply_lr_scale_at_fit_start(self) -> bool:
        """Template method: whether ``lr_scale`` applies to the optimizers of ``fit`` start."""
        return True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr_scale is not None and self._apply_lr_scale_at_fit_start():
            scale_learning_rates(trainer, self.lr_scale)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        spec = get_spec(pl_module)
        if spec is not None:
            checkpoint[SPEC_KEY] = spec


class StructuredConversion(ConversionCheckpoint):
    """Convert selected layers at epoch ``at_epoch`` and fine-tune in the same ``fit`` (single device).

    Example::

        trainer = Trainer(max_epochs=12, callbacks=[
            StructuredConversion("lowrank", at_epoch=8, energy=0.95, lr_scale=0.1,
                                 exclude=["net.features.conv1", "net.classifier.fc3"]),
        ])
        trainer.fit(model, datamodule)       # 8 dense epochs, convert, 4 fine-tuning epochs
        # later, in a fresh process:
        load_converted(trainer.checkpoint_callback.best_model_path, fresh_model)

    Args:
        method: ``"lowrank"``, ``"acdc"`` or ``"tied"``.
        at_epoch: convert at the start of this (0-based) epoch, i.e. after ``at_epoch`` dense
            epochs; the remaining ``max_epochs - at_epoch`` epochs fine-tune.
        lr_scale: multiply the fine-tuning learning rates by this factor (e.g. ``0.1``).
        scheduler: ``"continue"`` (default): the new LR schedulers are stepped to the current
            epoch/step, so the schedule goes on where it was; ``"restart"``: they start afresh.
        include, exclude, types: layer selection (names relative to the LightningModule, e.g.
            ``"net.features.*"``), as in :func:`~lightning_struct.surgery.convert`.
        energy, ratio, rank, budget, budget_on, scheme: low-rank rank rule and scheme.
        objective, sequential: what the low-rank factors minimize (``"weight"`` or ``"output"``
            on the calibration batches, optionally fitted layer after layer), as in
            :class:`~lightning_struct.surgery.options.ConversionOptions`.
        calibration_batches: training batches used for FLOPs, errors, the output objective and
            the ACDC fit.
        restart_checkpoint_ranking: at conversion, forget the best/top-k scores of every
            ``ModelCheckpoint`` that monitors a metric, so "best" means the best *converted*
            checkpoint (a dense epoch's score would otherwise win, and testing "best" would
            restore dense weights). The dense checkpoint files stay on disk.
        **convert_kwargs: further :func:`~lightning_struct.surgery.convert` arguments
            (``acdc_factors``, ``acdc_steps``, ``acdc_lr`` ...).

    Raises:
        ValueError: bad arguments (at construction).
        MisconfigurationException: a multi-process strategy (use the two-phase form), or
            ``at_epoch >= max_epochs``.
    """

    def __init__(
        self,
        method: str = "lowrank",
        at_epoch: int = 1,
        lr_scale: float | None = None,
        *,
        scheduler: str = "continue",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: Sequence[type | str] | None = None,
        energy: float | None = None,
        ratio: float | None = None,
        rank: int | Sequence[int] | None = None,
        budget: float | None = None,
        budget_on: str = "params",
        scheme: str = "channel",
        objective: str = "weight",
        sequential: bool = False,
        calibration_batches: int = 4,
        restart_checkpoint_ranking: bool = True,
        **convert_kwargs: Any,
    ) -> None:
        super().__init__(lr_scale)
        self.options = ConversionOptions.from_mapping(
            dict(
                method=method, include=include, exclude=exclude, types=types, energy=energy, ratio=ratio,
                rank=rank, budget=budget, budget_on=budget_on, scheme=scheme, objective=objective,
                sequential=sequential, calibration_batches=calibration_batches, **convert_kwargs,
            ),  # fmt: skip
            "StructuredConversion",
        )
        check_int(at_epoch, "at_epoch", "StructuredConversion", minimum=0)
        check_choice(scheduler, "scheduler", ("continue", "restart"), "StructuredConversion")
        check_int(calibration_batches, "calibration_batches", "StructuredConversion", minimum=1)
        self.at_epoch = at_epoch
        self.scheduler = scheduler
        self.restart_checkpoint_ranking = bool(restart_checkpoint_ranking)
        self.converted = False
        self.report: ConversionReport | None = None  # of this process's conversion (not checkpointed)

    @property
    def method(self) -> str:
        """The conversion method (``self.options.method``)."""
        return self.options.method

    @property
    def calibration_batches(self) -> int:
        """Training batches taken for calibration (``self.options.calibration_batches``)."""
        return int(self.options.calibration_batches)  # type: ignore[arg-type]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, at_epoch=self.at_epoch)

    # ---------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        why = _cannot_rewrap(trainer.strategy)
        if why is not None:
            raise MisconfigurationException(
                f"StructuredConversion converts layers inside a running fit, which is not supported with "
                f"strategy {type(trainer.strategy).__name__} (world size {trainer.world_size}): {why}. Use "
                f"strategy='ddp' (the subprocess launcher), or the two-phase form: "
                f"lightning_struct.fit_convert_finetune(...) or a `conversion:` section in "
                f"`lightning-struct train`, which converts between two fits."
            )
        if not self.converted and not get_spec(pl_module):
            # the whole selection is checked now, not after `at_epoch` dense epochs
            select_candidates(pl_module, self.options)
        max_epochs = trainer.max_epochs
        if trainer.fast_dev_run:
            if self.at_epoch > 0:
                rank_zero_warn(
                    f"StructuredConversion(at_epoch={self.at_epoch}): fast_dev_run runs one epoch, no conversion"
                )
            return
        if max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs and not self.converted:
            raise MisconfigurationException(
                f"StructuredConversion(at_epoch={self.at_epoch}) never runs with max_epochs={max_epochs}; "
                f"choose at_epoch < max_epochs (the remaining epochs fine-tune the converted model)"
            )

    @override
    def _apply_lr_scale_at_fit_start(self) -> bool:
        return False  # the LR scale applies to the optimizers created at conversion time

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.converted or trainer.current_epoch < self.at_epoch:
            return
        self.report = self.convert_now(trainer, pl_module)

    def convert_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ConversionReport:
        """Convert, re-create the optimizers and schedulers, log the report."""
        distributed = trainer.world_size > 1
        report: ConversionReport | None = None
        if trainer.is_global_zero or not distributed:
            # the plan (layers, ranks, fitted factors) is made once, on rank 0, from its batches
            batches = take_batches(train_loader_of(trainer), self.calibration_batches)
            report = convert(pl_module, self.options, calibration=batches or None)
        if distributed:
            report = trainer.strategy.broadcast(report, src=0)
            assert report is not None
            if not trainer.is_global_zero:
                apply_entries(pl_module, report.spec)  # the same structure, built locally
            _broadcast_module_state(pl_module)  # ... with rank 0's values, bit for bit
        assert report is not None
        self.converted = True
        _rewrap_ddp(trainer)
        announce_structure_change(trainer, pl_module, [e["name"] for e in report.spec])
        trainer.strategy.setup_optimizers(trainer)
        _optimizers_to_device(trainer.strategy.optimizers, trainer.strategy.root_device)
        if self.lr_scale is not None:
            scale_learning_rates(trainer, self.lr_scale)
        if self.scheduler == "continue":
            _fast_forward_schedulers(trainer)
        if self.restart_checkpoint_ranking:
            _restart_checkpoint_ranking(trainer)
        self._log(trainer, report)
        return report

    def _log(self, trainer: pl.Trainer, report: ConversionReport) -> None:
        rank_zero_info(f"StructuredConversion at epoch {trainer.current_epoch}:\n{report}")
        log_scalars(trainer, report.scalars())
        log_table(trainer, "conversion/layers", ConversionReport.COLUMNS, report.rows())

    # ---------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"converted": self.converted}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.converted = bool(state_dict.get("converted", False))

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the structure was rebuilt by the pre-load hook; a spec means the conversion happened
        if checkpoint.get(SPEC_KEY):
            self.converted = True
