"""Interrupt a fit cleanly and resume it exactly.

:class:`Resumable` does three things a long run needs and plain Lightning leaves out:

* **Ctrl+C stops at the next batch boundary.** The first SIGINT during ``fit`` is turned into
  Lightning's own SIGTERM path (the loops stop after the current batch, every DDP rank at the
  same step); a second SIGINT aborts at once. SIGTERM (a cluster pre-emption) takes the same path.
* **A resumable checkpoint is left behind.** On such a stop the callback writes
  ``<checkpoint dir>/last.ckpt`` with the full loop state and says where it stopped and how to
  resume (``trainer.fit(..., ckpt_path=...)``; ``lightning-struct train`` prints its own command
  line). Lightning itself exits 0 on SIGTERM and 1 on Ctrl+C; :attr:`interruption` lets the caller
  exit 130 / 143 instead.
* **The random streams are part of the checkpoint.** torch (CPU and every CUDA device), NumPy and
  Python states are saved at every checkpoint and put back at the first training batch after a
  restore, so dropout and augmentation continue as if the run had never stopped. With
  :class:`~lightning_struct.data.ResumableLoader` (the data modules here use it) the batch order
  continues too: a single-process CPU run resumed mid-epoch ends with bit-identical weights.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

__all__ = ["Interruption", "Resumable", "last_checkpoint_path"]

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


@dataclass(frozen=True)
class Interruption:
    """Where a fit stopped on a signal, and the checkpoint to resume from (``None`` if none was written)."""

    signal: str
    epoch: int
    global_step: int
    checkpoint: str | None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 1)


def _rng_state() -> dict[str, Any]:
    """The random states as tensors, ints and tuples only (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the ``ModelCheckpoint`` directory, else ``<default_root_dir>/checkpoints``."""
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
        return Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class Resumable(Callback):
    """Graceful Ctrl+C / SIGTERM during ``fit``, a resumable ``last.ckpt`` on such a stop, RNG in checkpoints.

    Args:
        save_on_interrupt: write ``last.ckpt`` (in the ``ModelCheckpoint`` directory, else
            ``<default_root_dir>/checkpoints``) when a signal stops the fit.
        restore_rng: save the random states in every checkpoint and restore them on resume.
    """

    def __init__(self, *, save_on_interrupt: bool = True, restore_rng: bool = True) -> None:
        self.save_on_interrupt = bool(save_on_interrupt)
        self.restore_rng = bool(restore_rng)
        self.interruption: Interruption | None = None
        self._signal: str | None = None
        self._previous_sigint: Any = None
        self._pending_rng: dict[str, Any] | None = None

    # ------------------------------------------------------------------ signals
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.interruption = None
        self._signal = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed here, after Lightning's signal connector has recorded the handlers it restores
        # at teardown (it does so after on_fit_start): the fit leaves SIGINT as it found it
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            self._trainer = trainer

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        trainer = getattr(self, "_trainer", None)
        if self._signal is not None or trainer is None:  # second Ctrl+C: stop now
            raise KeyboardInterrupt
        self._signal = "SIGINT"
        trainer._signal_connector.received_sigterm = True  # Lightning stops after this batch, all ranks alike
        rank_zero_info("\nCtrl+C: stopping after the current batch and saving a checkpoint (press Ctrl+C again to abort)")

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None
        self._trainer = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.state.fn != TrainerFn.FITTING:
            return
        name = self._signal or ("SIGTERM" if isinstance(exception, SIGTERMException) else "SIGINT")
        path: str | None = None
        # a SIGTERM-path stop reaches every rank at the same step, so the collective save is safe;
        # a hard KeyboardInterrupt under DDP may leave the ranks apart: keep the last saved checkpoint
        if self.save_on_interrupt and (isinstance(exception, SIGTERMException) or trainer.world_size == 1):
            path = str(self._checkpoint_path(trainer))
            trainer.save_checkpoint(path)
        elif self.save_on_interrupt:
            last = self._checkpoint_path(trainer)
            path = str(last) if last.is_file() else None
        self.interruption = Interruption(name, trainer.current_epoch, trainer.global_step, path)
        where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}"
        if path:
            rank_zero_info(f"{name}: fit stopped at {where}; resumable checkpoint {path} (resume: ckpt_path={path!r})")
        else:
            rank_zero_info(f"{name}: fit stopped at {where}; no checkpoint was written")

    @staticmethod
    def _checkpoint_path(trainer: pl.Trainer) -> Path:
        return last_checkpoint_path(trainer)

    # ------------------------------------------------------------------ random streams
    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state()} if self.restore_rng else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.restore_rng and "rng" in state_dict:
            self._pending_rng = state_dict["rng"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
