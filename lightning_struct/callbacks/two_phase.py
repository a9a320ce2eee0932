"""Fit, convert, fine-tune: conversion between two ``fit`` calls (works under every strategy).

Converting inside a running ``fit`` creates parameters that the strategy never wrapped (see
:mod:`lightning_struct.callbacks.conversion` for why that breaks DDP). Here the conversion
happens between two ``fit`` calls, in the main process, on the model the first ``fit`` left
behind (under ``ddp_spawn`` Lightning copies rank 0's final weights back into it). The second
Trainer then wraps the *converted* model, so DDP's reducer, the optimizers and the schedulers
are all built on the new parameters, and its checkpoints carry the conversion spec
(:class:`~lightning_struct.callbacks.conversion.ConversionCheckpoint`).

Usable from any script with any Trainer factory; the ``lightning-struct train`` application calls
it (through :mod:`lightning_struct.app.two_phase`) when the config has a ``conversion:`` section.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_struct.callbacks._batches import take_batches, train_loader_of
from lightning_struct.callbacks._log import log_scalars, log_table
from lightning_struct.callbacks.conversion import ConversionCheckpoint
from lightning_struct.surgery import ConversionOptions, ConversionReport, convert, get_spec, load_converted

log = logging.getLogger(__name__)

__all__ = ["TwoPhaseResult", "fit_convert_finetune", "last_checkpoint"]

TrainerFactory = Callable[[str, list[Callback]], pl.Trainer]


@dataclass
class TwoPhaseResult:
    """What :func:`fit_convert_finetune` did.

    Attributes:
        report: the conversion report (``None`` when resuming a fine-tuning run).
        fit_trainer: the Trainer of the dense phase (``None`` when it was skipped).
        finetune_trainer: the Trainer of the fine-tuning phase.
        dense_metrics: ``callback_metrics`` of the dense phase (floats).
    """

    report: ConversionReport | None
    fit_trainer: pl.Trainer | None
    finetune_trainer: pl.Trainer
    dense_metrics: dict[str, float]


def _scalars(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def _check_same_structure_across_ranks(model: torch.nn.Module) -> None:
    """Under an initialised process group, every rank must have converted identically."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    mine = get_spec(model)
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError(
            "fit_convert_finetune: the ranks chose different conversions (e.g. an energy threshold "
            "falling between two singular values differently); use rank= or ratio= instead of energy="
        )


def fit_convert_finetune(
    trainer_factory: TrainerFactory,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    conversion: ConversionOptions | Mapping[str, Any] | None = None,
    *,
    fit: bool = True,
    ckpt_path: str | None = None,
    init_ckpt: str | None = None,
    finetune_ckpt_path: str | None = None,
    lr_scale: float | None = None,
    calibration_batches: int = 4,
) -> TwoPhaseResult:
    """Dense ``fit`` -> :func:`convert` -> fine-tuning ``fit`` with a fresh Trainer.

    Args:
        trainer_factory: ``(phase, extra_callbacks) -> Trainer`` with ``phase`` in ``"fit"``,
            ``"finetune"``; it must add ``extra_callbacks`` to the Trainer's callbacks. Give
            each phase fresh callbacks (a ``ModelCheckpoint`` must not carry its best score from
            the dense phase into the fine-tuning phase); loggers may be shared.
        model: the dense LightningModule (its ``configure_optimizers`` is called again by the
            fine-tuning Trainer, on the converted parameters).
        datamodule: the data; its first ``calibration_batches`` training batches calibrate the
            conversion (FLOPs, errors, ACDC fit).
        conversion: a :class:`~lightning_struct.surgery.ConversionOptions` or a mapping of its
            keys, ``method`` included.
        fit: run the dense phase (``False``: convert the model as given / as loaded from
            ``init_ckpt``, e.g. a force-trained checkpoint).
        ckpt_path: resume the dense phase from this checkpoint.
        init_ckpt: load these weights (a dense checkpoint, Lightning or ``save_converted``)
            before anything else.
        finetune_ckpt_path: resume an interrupted fine-tuning phase from its checkpoint: the
            dense phase and the conversion are skipped, the structure is rebuilt from the spec.
        lr_scale: multiply the fine-tuning learning rates by this factor.
        calibration_batches: training batches used for calibration.

    Returns:
        :class:`TwoPhaseResult`; ``model`` is converted and fine-tuned in place.
    """
    if isinstance(conversion, ConversionOptions):
        options = conversion
    else:
        options = ConversionOptions.from_mapping(dict(conversion or {}), "fit_convert_finetune")

    report: ConversionReport | None = None
    fit_trainer: pl.Trainer | None = None
    dense_metrics: dict[str, float] = {}
    if finetune_ckpt_path is None:
        if init_ckpt is not None:
            load_converted(init_ckpt, model)
            log.info("fit_convert_finetune: weights loaded from %s", init_ckpt)
        if fit:
            fit_trainer = trainer_factory("fit", [])
            fit_trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
            dense_metrics = _scalars(fit_trainer)
        batches = take_batches(train_loader_of(None, datamodule), calibration_batches)
        if batches:  # every batch drawn calibrates (the options' own cap must not drop some)
            options = options.replace(calibration_batches=len(batches))
        try:
            report = convert(model, options, calibration=batches or None)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{err}{_resume_hint(fit_trainer)}") from err
        _check_same_structure_across_ranks(model)
        log.info("fit_convert_finetune: %s", report)
    finetune_trainer = trainer_factory("finetune", [ConversionCheckpoint(lr_scale=lr_scale)])
    if report is not None:
        log_scalars(finetune_trainer, report.scalars(), step=0)
        log_table(finetune_trainer, "conversion/layers", ConversionReport.COLUMNS, report.rows(), step=0)
    finetune_trainer.fit(model, datamodule=datamodule, ckpt_path=finetune_ckpt_path)
    return TwoPhaseResult(report, fit_trainer, finetune_trainer, dense_metrics)


def _resume_hint(fit_trainer: pl.Trainer | None) -> str:
    """How to convert again without repeating the dense phase that just finished."""
    if fit_trainer is None:
        return ""
    ckpt = last_checkpoint(fit_trainer)
    if ckpt is None:
        return ""
    return (
        f"\nThe dense phase is saved: convert again without re-training it with conversion.fit=false "
        f"conversion.init_ckpt={ckpt} (fit=False, init_ckpt=... in fit_convert_finetune)"
    )


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The fine-tuning Trainer's last (or best) checkpoint path, if one was written."""
    cb = trainer.checkpoint_callback
    for attr in ("last_model_path", "best_model_path"):
        p = getattr(cb, attr, None) if cb is not None else None
        if p:
            return Path(p)
    return None
