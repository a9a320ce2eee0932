"""Logging helpers shared by the callbacks.

Scalars go to every logger of the Trainer (rank zero only); W&B-only payloads (tables,
histograms, charts) go to the ``WandbLogger`` instances when there are any, and are
silently skipped otherwise: W&B is never a hard requirement.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The Trainer's W&B loggers (empty list when there are none)."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


@rank_zero_only
def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Send plain scalars to every logger at ``step`` (default: the global step)."""
    step = trainer.global_step if step is None else step
    clean = {k: float(v) for k, v in metrics.items()}
    for lg in trainer.loggers:
        lg.log_metrics(clean, step=step)


@rank_zero_only
def log_wandb(trainer: pl.Trainer, payload: Mapping[str, Any], step: int | None = None) -> None:
    """Send W&B objects (``wandb.Histogram``, charts, ``wandb.Table``) to the W&B loggers only."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    step = trainer.global_step if step is None else step
    for lg in loggers:
        try:
            lg.log_metrics(dict(payload), step=step)
        except Exception as err:  # logging must never kill training
            log.warning("W&B logging of %s failed: %s", sorted(payload), err)


@rank_zero_only
def log_table(
    trainer: pl.Trainer, key: str, columns: Sequence[str], data: Sequence[Sequence[Any]], step: int | None = None
) -> None:
    """A ``wandb.Table`` to the W&B loggers (no-op without one)."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    step = trainer.global_step if step is None else step
    for lg in loggers:
        try:
            lg.log_table(key=key, columns=list(columns), data=[list(r) for r in data], step=step)
        except Exception as err:
            log.warning("W&B table %s failed: %s", key, err)


def run_dir(trainer: pl.Trainer) -> str:
    """Where this run writes files: what ``trainer.log_dir`` gives, without its collective.

    ``trainer.log_dir`` broadcasts from rank 0, so calling it from rank 0 alone (a rank-zero-only
    plot) blocks forever under the ``ddp`` launcher; this is the same choice, made locally.
    """
    if trainer.loggers:
        lg = trainer.loggers[0]
        path = getattr(lg, "log_dir", None) if type(lg).__name__ in ("CSVLogger", "TensorBoardLogger") else None
        path = path or getattr(lg, "save_dir", None)
        if path:
            return str(path)
    return str(trainer.default_root_dir)

