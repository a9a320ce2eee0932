"""Fit, convert, fine-tune: conversion between two ``fit`` calls (works under every strategy).

Converting inside a running ``fit`` creates parameters that the strategy never wrapped (see
:mod:`lightning_struct.callbacks.conversion` for why that breaks DDP). Here the conversion
happens between two ``fit`` calls, in the main process, on the model the first ``fit`` left
behind (under ``ddp_spawn`` Lightning copies rank 0's final weights back into it). The second
Trainer then wraps the *converted* model, so DDP's reducer, the optimizers and the schedulers
are all built on the new parameters, and its checkpoints carry the conversion spec
(:class:`~lightning_struct.callbacks.conversion.ConversionCheckpoint`).

The ``lightning-struct train`` application calls :func:`fit_convert_finetune` when the config
has a ``conversion:`` section (see ``conf/conversion/`` and ``recipes/wen2017/*_lowrank.yaml``).
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

from lightning_struct.convert.checkpoint import load_converted
from lightning_struct.convert.report import ConversionReport
from lightning_struct.convert.spec import get_spec
from lightning_struct.convert.surgery import METHODS, _check_rules, convert

log = logging.getLogger(__name__)

__all__ = [
    "CONVERSION_KEYS",
    "PHASE_KEYS",
    "TwoPhaseResult",
    "fit_convert_finetune",
    "fit_convert_finetune_from_config",
]

#: keys of a ``conversion:`` config section that are passed to :func:`convert`
CONVERSION_KEYS = (
    "method", "energy", "ratio", "rank", "budget", "budget_on", "include", "exclude", "types", "scheme",
    "input_size", "acdc_factors", "acdc_relu", "acdc_permute", "acdc_sigma", "acdc_steps", "acdc_lr", "tied_staged", "seed",
)  # fmt: skip

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


def _calibration(datamodule: pl.LightningDataModule | None, n: int) -> list[Any]:
    if datamodule is None or n <= 0:
        return []
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    out = []
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(loader):  # type: ignore[arg-type]
            if i >= n:
                break
            out.append(batch)
    return out


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
    conversion: Mapping[str, Any] | None = None,
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
        conversion: :func:`convert` keyword arguments, ``method`` included (see
            :data:`CONVERSION_KEYS`).
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
    from lightning_struct.callbacks.conversion import ConversionCheckpoint

    conv = dict(conversion or {})
    method = conv.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"fit_convert_finetune: conversion.method={method!r}; allowed: {list(METHODS)}")
    unknown = sorted(set(conv) - set(CONVERSION_KEYS))
    if unknown:
        raise ValueError(
            f"fit_convert_finetune: unknown conversion key(s) {unknown}; allowed: {sorted(CONVERSION_KEYS)}"
        )
    _check_rules(
        method,
        conv.get("energy"),
        conv.get("ratio"),
        conv.get("rank"),
        conv.get("budget"),
        conv.get("budget_on", "params"),
    )

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
        batches = _calibration(datamodule, calibration_batches)
        report = convert(model, method, calibration=batches or None, **conv)
        _check_same_structure_across_ranks(model)
        log.info("fit_convert_finetune: %s", report)
    finetune_trainer = trainer_factory("finetune", [ConversionCheckpoint(lr_scale=lr_scale)])
    if report is not None:
        from lightning_struct.callbacks._log import log_scalars, log_table

        log_scalars(finetune_trainer, report.scalars(), step=0)
        log_table(finetune_trainer, "conversion/layers", ConversionReport.COLUMNS, report.rows(), step=0)
    finetune_trainer.fit(model, datamodule=datamodule, ckpt_path=finetune_ckpt_path)
    return TwoPhaseResult(report, fit_trainer, finetune_trainer, dense_metrics)


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The fine-tuning Trainer's last (or best) checkpoint path, if one was written."""
    cb = trainer.checkpoint_callback
    for attr in ("last_model_path", "best_model_path"):
        p = getattr(cb, attr, None) if cb is not None else None
        if p:
            return Path(p)
    return None


#: keys of the ``conversion:`` config section that steer the two phases (the rest go to convert)
PHASE_KEYS = (
    "fit",
    "init_ckpt",
    "finetune_epochs",
    "lr_scale",
    "calibration_batches",
    "finetune_ckpt_path",
    "finetune_drop_callbacks",
)


def fit_convert_finetune_from_config(
    cfg: Any,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    dense_trainer: pl.Trainer,
    loggers: list[Any],
    build_callbacks: Callable[[Any], list[Callback]],
) -> tuple[pl.Trainer, dict[str, float]]:
    """The ``conversion:`` section of ``lightning-struct train``: fit, convert, fine-tune.

    Args:
        cfg: the composed run config (``cfg.conversion``, ``cfg.trainer``, ``cfg.callbacks``,
            ``cfg.ckpt_path``).
        model, datamodule: as instantiated by the app.
        dense_trainer: the Trainer built from ``cfg.trainer`` (used for the dense phase).
        loggers: shared by both phases (one W&B run / one CSV file for the whole experiment).
        build_callbacks: instantiates a ``callbacks`` config (fresh objects for the second
            phase, so a ``ModelCheckpoint`` does not carry the dense phase's best score).

    The fine-tuning Trainer is ``cfg.trainer`` with ``max_epochs = conversion.finetune_epochs``;
    its checkpoints go to ``<ModelCheckpoint dirpath>/finetune``. Callbacks named in
    ``conversion.finetune_drop_callbacks`` (e.g. ``[force]``) are left out of the fine-tuning.

    Returns:
        The fine-tuning Trainer and extra metrics (``dense/<metric>`` of the dense phase and the
        ``conversion/*`` totals).
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    section = (
        OmegaConf.to_container(cfg.conversion, resolve=True)
        if isinstance(cfg.conversion, DictConfig)
        else dict(cfg.conversion)
    )
    assert isinstance(section, dict)
    unknown = sorted(set(section) - set(CONVERSION_KEYS) - set(PHASE_KEYS))
    if unknown:
        raise ValueError(
            f"conversion: unknown key(s) {unknown}; allowed: {sorted(CONVERSION_KEYS + PHASE_KEYS)}"
        )
    conv = {k: v for k, v in section.items() if k in CONVERSION_KEYS and v is not None}
    finetune_epochs = section.get("finetune_epochs")
    if not isinstance(finetune_epochs, int) or finetune_epochs < 1:
        raise ValueError(f"conversion.finetune_epochs={finetune_epochs!r} must be an int >= 1")
    drop = set(section.get("finetune_drop_callbacks") or [])

    def factory(phase: str, extra: list[Callback]) -> pl.Trainer:
        if phase == "fit":
            return dense_trainer
        cb_cfg = OmegaConf.create(OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=True))
        for name in list(cb_cfg.keys()):
            node = cb_cfg[name]
            if name in drop:
                del cb_cfg[name]
            elif (
                node is not None
                and str(node.get("_target_", "")).endswith("ModelCheckpoint")
                and node.get("dirpath")
            ):
                node.dirpath = str(Path(node.dirpath) / "finetune")
        missing = drop - set(OmegaConf.to_container(cfg.get("callbacks") or {}).keys())  # type: ignore[union-attr]
        if missing:
            raise ValueError(f"conversion.finetune_drop_callbacks names unknown callbacks {sorted(missing)}")
        callbacks = build_callbacks(cb_cfg) + list(extra)
        return instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, max_epochs=finetune_epochs
        )

    result = fit_convert_finetune(
        factory,
        model,
        datamodule,
        {"method": section.get("method"), **conv},
        fit=bool(section.get("fit", True)),
        ckpt_path=cfg.get("ckpt_path"),
        init_ckpt=section.get("init_ckpt"),
        finetune_ckpt_path=section.get("finetune_ckpt_path"),
        lr_scale=section.get("lr_scale"),
        calibration_batches=int(section.get("calibration_batches") or 0),
    )
    extra = {f"dense/{k}": v for k, v in result.dense_metrics.items()}
    if result.report is not None:
        extra.update(result.report.scalars())
    return result.finetune_trainer, extra
