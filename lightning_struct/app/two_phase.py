"""The ``conversion:`` section of ``lightning-struct train``: Hydra config -> the two-phase run.

The orchestration itself (fit, convert, fine-tune) is :func:`lightning_struct.callbacks.two_phase.fit_convert_finetune`;
this module only reads the config section, builds the fine-tuning Trainer from ``cfg.trainer``
and ``cfg.callbacks`` and hands both over.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_struct._checks import check_int, check_unknown
from lightning_struct.callbacks.two_phase import fit_convert_finetune
from lightning_struct.surgery import OPTION_KEYS, ConversionOptions

__all__ = ["PHASE_KEYS", "SECTION_KEYS", "fit_convert_finetune_from_config"]

#: keys of the ``conversion:`` config section that steer the two phases (the rest are conversion options)
PHASE_KEYS = (
    "fit",
    "init_ckpt",
    "finetune_epochs",
    "lr_scale",
    "calibration_batches",
    "finetune_ckpt_path",
    "finetune_drop_callbacks",
    "finetune_scheduler",
)
#: every key a ``conversion:`` section may hold
SECTION_KEYS = tuple(sorted(set(OPTION_KEYS) | set(PHASE_KEYS)))


def _finetune_schedule(model: Any, scheduler_cfg: Any, dense_epochs: Any, finetune_epochs: int) -> None:
    """Phase 2's LR schedule: ``conversion.finetune_scheduler`` if given; else a ``T_max`` that was
    the dense phase's epoch count (``${trainer.max_epochs}``) becomes the fine-tuning's."""
    import functools

    if scheduler_cfg:
        if not hasattr(model, "scheduler_factory"):
            raise ValueError(
                f"conversion.finetune_scheduler: {type(model).__name__} has no scheduler_factory "
                "(ImageClassifier has); set the fine-tuning schedule in your module instead"
            )
        model.scheduler_factory = instantiate(scheduler_cfg)
        return
    factory = getattr(model, "scheduler_factory", None)
    if isinstance(factory, functools.partial) and factory.keywords.get("T_max") == dense_epochs != finetune_epochs:
        model.scheduler_factory = functools.partial(factory.func, *factory.args, **{**factory.keywords, "T_max": finetune_epochs})


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
    ``conversion.finetune_scheduler`` (a scheduler config, e.g. MultiStepLR with the authors'
    fine-tuning steps) replaces ``model.scheduler`` for the fine-tuning; without it, a
    ``T_max`` equal to the dense ``trainer.max_epochs`` is set to ``finetune_epochs``.

    Returns:
        The fine-tuning Trainer and extra metrics (``dense/<metric>`` of the dense phase and the
        ``conversion/*`` totals).
    """
    section = (
        OmegaConf.to_container(cfg.conversion, resolve=True)
        if isinstance(cfg.conversion, DictConfig)
        else dict(cfg.conversion)
    )
    assert isinstance(section, dict)
    check_unknown(section, SECTION_KEYS, "key(s)", "conversion")
    options = ConversionOptions.from_mapping(
        {k: v for k, v in section.items() if k in OPTION_KEYS and k not in PHASE_KEYS}, "conversion"
    )
    finetune_epochs = check_int(section.get("finetune_epochs"), "conversion.finetune_epochs", minimum=1)
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
        _finetune_schedule(model, section.get("finetune_scheduler"), cfg.trainer.get("max_epochs"), finetune_epochs)
        return instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, max_epochs=finetune_epochs
        )

    result = fit_convert_finetune(
        factory,
        model,
        datamodule,
        options,
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
