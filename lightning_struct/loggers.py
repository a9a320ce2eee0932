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
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)

__all__ = ["CSVLogger", "WandbLogger", "json_safe"]


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
    """Lightning's ``WandbLogger`` (same arguments) that leaves a run readable without W&B.

    * At the end of each stage (``finalize``) it writes ``config.yaml`` (the run's config) and
      ``summary.json`` (the last value of every logged metric, plus what callbacks put in the
      summary, e.g. the spectral monitor's ``spectral_final/...``) into the run's ``files/``
      directory. An offline run (``wandb/offline-run-*/files/``) is then inspectable with a text
      editor or ``json.load``; wandb 0.31 has no public reader for the ``.wandb`` file itself.
    * Lightning always sends ``anonymous=None``, and current ``wandb`` then prints "The anonymous
      setting has no effect" on every run; the key is dropped unless it was asked for.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            self.write_run_files()
        except Exception as err:  # a convenience copy: never fail the run for it
            log.warning("WandbLogger: could not write config.yaml / summary.json: %s", err)
        super().finalize(status)

    def write_run_files(self) -> tuple[Path, Path] | None:
        """Write ``config.yaml`` and ``summary.json`` into the run's ``files/`` directory; returns their paths."""
        run = self._experiment
        if run is None or not getattr(run, "dir", None):
            return None
        import json

        import yaml

        files = Path(run.dir)
        files.mkdir(parents=True, exist_ok=True)
        config = json_safe(dict(run.config))
        summary = json_safe(dict(run.summary))
        cfg_path, sum_path = files / "config.yaml", files / "summary.json"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        sum_path.write_text(json.dumps(summary, indent=1, sort_keys=True))
        return cfg_path, sum_path


def json_safe(value: Any) -> Any:
    """JSON/YAML-safe copy: mappings and sequences recursively, numbers as numbers (NaN/inf as
    strings), anything else by ``str``."""
    import math
    from collections.abc import Mapping

    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    try:
        as_float = float(value)  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(value)
    return as_float if math.isfinite(as_float) else str(as_float)
