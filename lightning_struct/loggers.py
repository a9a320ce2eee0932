"""Loggers that lose nothing and print nothing stray: a CSV logger whose ``metrics.csv`` survives new columns, processes and resumes.

Lightning's ``CSVLogger`` keeps the header of ``metrics.csv`` in the writer object. Two things then
lose data:

* under ``ddp_spawn`` the ``test`` stage runs in fresh processes whose writer has never seen the
  training columns; its first save rewrites the file with only the test columns and fails
  (``dict contains fields not in fieldnames``), leaving a file that holds the test metrics only;
* a new writer on a directory that already has a ``metrics.csv`` (a resumed run, a second stage)
  deletes that file.

:class:`CSVLogger` here is the same logger (same arguments, same file layout) whose writer reads
the header that is on disk before each save, writes the union of the old and new columns, and
appends to an existing file instead of deleting it.
"""

from __future__ import annotations

import csv
import logging
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)

__all__ = ["CSVLogger", "WandbLogger"]


class _KeepingWriter(ExperimentWriter):
    """An ``ExperimentWriter`` that merges with, and never deletes, the ``metrics.csv`` on disk."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            log.info("appending to the existing %s (its rows are kept)", self.metrics_file_path)

    def _header_on_disk(self) -> list[str]:
        if not self._fs.isfile(self.metrics_file_path):
            return []
        with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
            return next(csv.reader(fh), [])

    def save(self) -> None:
        if not self.metrics:
            return
        on_disk = self._header_on_disk()  # [] when there is no file yet
        keys = sorted(set(on_disk) | set(self.metrics_keys) | set().union(*self.metrics))
        self.metrics_keys = keys
        if keys != on_disk:  # a new file or new columns: write the header, keeping every row already written
            rows: list[dict[str, str]] = []
            if on_disk:
                with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                    rows = list(csv.DictReader(fh))
            with self._fs.open(self.metrics_file_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
        with self._fs.open(self.metrics_file_path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=keys).writerows(self.metrics)
        self.metrics = []


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` (same arguments) whose ``metrics.csv`` keeps every column and row.

    New columns from a later stage or process widen the file; an existing file in the log
    directory (resume, ``ddp_spawn`` test stage) is appended to rather than deleted.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` (same arguments) that does not pass a deprecated setting to ``wandb.init``.

    Lightning always sends ``anonymous=None``, and current ``wandb`` then prints "The anonymous
    setting has no effect" on every run; the key is dropped unless it was asked for.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
