"""Resumable + ResumableLoader: a fit stopped mid-epoch by a signal resumes to bit-identical weights.

What must be equal, and is: on one CPU process with ``deterministic=True``, the final parameters
(every bit) and the last logged training loss of (fit 3 epochs) and (fit, SIGINT after the 7th
batch, resume from the ``last.ckpt`` it leaves, fit to 3 epochs). That needs the same batches in the
same order after the resume (``ResumableLoader``) and the same dropout masks (RNG in checkpoint).
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from lightning_struct import Resumable, ResumableLoader
from lightning_struct.data import EpochShuffleSampler


class DropoutNet(pl.LightningModule):
    """The user's own module: dropout (RNG per step) and SGD with momentum (optimizer state)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(44, 6, generator=g), torch.randint(0, 3, (44,), generator=g))
        return ResumableLoader(ds, batch_size=8, shuffle=True, seed=5)  # 6 batches, the last one of 4


class SignalAt(pl.Callback):
    def __init__(self, step: int, sig: int) -> None:
        self.step, self.sig = step, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def _trainer(tmp_path, *callbacks, epochs=3):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    return quiet_trainer(tmp_path, [ckpt, Resumable(), *callbacks], max_epochs=epochs, enable_checkpointing=True, deterministic=True)


def _fit(tmp_path, *callbacks, ckpt_path=None):
    pl.seed_everything(0)
    model = DropoutNet()
    trainer = _trainer(tmp_path, *callbacks)
    trainer.fit(model, datamodule=Data(), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_epoch_then_resume_is_bit_identical(tmp_path, sig):
    ref, _ = _fit(tmp_path / "ref")

    with pytest.raises(SystemExit):  # Lightning's SIGTERM path; Resumable routes Ctrl+C through it
        _fit(tmp_path / "run", SignalAt(7, sig))
    # the handler is gone after the fit: a later Ctrl+C is the usual KeyboardInterrupt again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 7 and state["epoch"] == 1, "stopped after the 7th batch (epoch 1, batch 1)"

    resumed, trainer = _fit(tmp_path / "run", ckpt_path=str(last))
    assert trainer.global_step == ref.trainer.global_step == 18
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after the resume"
    assert resumed.losses[-1] == ref.losses[-1]
    assert resumed.losses == ref.losses[7:], "the resumed run sees the same batches and dropout masks"


def test_interruption_is_reported(tmp_path):
    cb = Resumable()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    trainer = quiet_trainer(tmp_path, [ckpt, cb, SignalAt(3, signal.SIGINT)], max_epochs=2, enable_checkpointing=True)
    with pytest.raises(SystemExit):
        trainer.fit(DropoutNet(), datamodule=Data())
    stop = cb.interruption
    assert stop is not None and stop.signal == "SIGINT" and stop.exit_code == 130
    assert stop.global_step == 3 and stop.checkpoint == str(tmp_path / "ck" / "last.ckpt")


def test_without_model_checkpoint_saves_under_root(tmp_path):
    cb = Resumable()
    trainer = quiet_trainer(tmp_path, [cb, SignalAt(2, signal.SIGTERM)], max_epochs=2)
    with pytest.raises(SystemExit):
        trainer.fit(DropoutNet(), datamodule=Data())
    assert cb.interruption.exit_code == 143
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_epoch_shuffle_depends_on_seed_and_epoch_only():
    s = EpochShuffleSampler(10, seed=3)
    s.set_epoch(2)
    a = list(s)
    list(EpochShuffleSampler(10, seed=99))  # other samplers draw nothing from a shared stream
    torch.rand(5)
    assert list(s) == a and sorted(a) == list(range(10))
    s.set_epoch(3)
    assert list(s) != a
    s.set_epoch(2)
    s.skip = 4
    assert list(s) == a[4:] and list(s) == a, "skip applies to one pass only"


def test_loader_state_round_trip_skips_consumed_batches():
    ds = TensorDataset(torch.arange(20.0))
    loader = ResumableLoader(ds, batch_size=3, shuffle=True, seed=1)  # 7 batches
    loader.sampler.set_epoch(4)
    full = [b[0].tolist() for b in loader]
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 4, "batches": 3}

    fresh = ResumableLoader(ds, batch_size=3, shuffle=True, seed=1)
    fresh.load_state_dict(state)
    assert [b[0].tolist() for b in fresh] == full[3:]
    assert len(fresh) == 7
    fresh.load_state_dict({"epoch": 4, "batches": 7})  # a finished epoch: nothing to skip
    assert [b[0].tolist() for b in fresh] == full
    # a loader without a shuffle sampler skips by drawing
    plain = ResumableLoader(ds, batch_size=3)
    plain.load_state_dict({"epoch": 0, "batches": 2})
    assert [b[0].tolist() for b in plain] == [b[0].tolist() for b in ResumableLoader(ds, batch_size=3)][2:]
