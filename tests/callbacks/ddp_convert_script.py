"""Run by tests/callbacks/test_conversion_ddp.py as ``python ddp_convert_script.py OUT METHOD MODE PRECISION``.

Lightning's ``ddp`` launcher re-runs this script for rank 1, as in Lightning's own DDP tests.
MODE: ``full`` (3 epochs, conversion at the start of epoch 1), ``stop`` (the same run, stopped
after epoch 1: after the conversion), ``resume`` (continue ``stop``'s ``last.ckpt`` to 3 epochs),
``stop0`` / ``resume0`` (stopped after epoch 0, before the conversion, then continued),
``two_phase`` (``fit_convert_finetune``: 1 dense epoch, convert, 2 fine-tuning epochs).
Each rank writes ``rank<r>.json``: a hash of its state dict, its layer types and its conversion flag;
rank 0 also writes ``out.pt`` (its logits on a fixed input).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_struct import ForceRegularization, SpectralMonitor, StructuredConversion


class UserNet(pl.LightningModule):
    """The user's own module (not ImageClassifier): convs, a hidden Linear, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.hidden = nn.Linear(32, 256)
        self.wide = nn.Linear(256, 256)  # where ACDC saves parameters and FLOPs
        self.head = nn.Linear(256, 4)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x))).mean(dim=(2, 3))
        return self.head(torch.relu(self.wide(torch.relu(self.hidden(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


class StopAfter(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def main(out: Path, method: str, mode: str, precision: str) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)  # a deadlock fails the test with every stack, not a hang
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    loader = DataLoader(data, batch_size=8)
    kw = {"rank": 4} if method == "lowrank" else {"acdc_steps": 20, "include": ["wide"]}
    conversion = StructuredConversion(method, at_epoch=1, calibration_batches=2, **kw)
    callbacks = [
        ForceRegularization(strength=1e-3),
        SpectralMonitor(every_n_steps=2, step_stats="norm"),  # step passes by the warm norm path
        conversion,
        ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0),
    ]
    if mode in ("stop", "stop0"):
        callbacks.append(StopAfter(1 if mode == "stop" else 0))
    if mode == "two_phase":
        return two_phase(out, loader, kw)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, precision=precision, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
        default_root_dir=out, gradient_clip_val=0.5,  # clipping works on the new optimizers' parameters
    )  # fmt: skip
    trainer.callbacks.extend(callbacks)
    model = UserNet()
    source = {"resume": "stop", "resume0": "stop0"}.get(mode)
    ckpt = str(out.parent / source / "checkpoints" / "last.ckpt") if source else None
    trainer.fit(model, loader, ckpt_path=ckpt)
    monitor = next(c for c in trainer.callbacks if isinstance(c, SpectralMonitor))
    report(out, trainer, model, conversion.converted, [n for n, _ in monitor.layers])


def report(out: Path, trainer: pl.Trainer, model: UserNet, converted: bool, monitored: list[str]) -> None:
    state = model.state_dict()
    digest = hashlib.sha256(b"".join(state[k].detach().cpu().contiguous().numpy().tobytes() for k in sorted(state)))
    info = {
        "hash": digest.hexdigest(),
        "types": {n: type(m).__name__ for n, m in model.named_children()} | {"body.2": type(model.body[2]).__name__},
        "converted": converted,
        "monitored": {n: type(model.get_submodule(n)).__name__ for n in monitored},
        "epoch": trainer.current_epoch,
        "ddp_params": sum(p.numel() for p in trainer.strategy.model.parameters()),
        "params": sum(p.numel() for p in model.parameters()),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
    if trainer.global_rank == 0:
        model.eval()
        with torch.no_grad():
            torch.save(model(torch.ones(2, 1, 8, 8)), out / "out.pt")


class Data(pl.LightningDataModule):
    def __init__(self, loader: DataLoader) -> None:
        super().__init__()
        self.loader = loader

    def train_dataloader(self) -> DataLoader:
        return self.loader


def two_phase(out: Path, loader: DataLoader, kw: dict) -> None:
    from lightning_struct import fit_convert_finetune

    trainers = []

    def factory(phase: str, extra: list) -> pl.Trainer:
        t = pl.Trainer(
            strategy="ddp", accelerator="cpu", devices=2, max_epochs=1 if phase == "fit" else 2, logger=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
            default_root_dir=out / phase, callbacks=[ForceRegularization(strength=1e-3), *extra],
        )  # fmt: skip
        trainers.append(t)
        return t

    model = UserNet()
    fit_convert_finetune(factory, model, Data(loader), {"method": "lowrank", **kw}, calibration_batches=2)
    report(out, trainers[-1], model, True, [])


if __name__ == "__main__":
    out, method, mode, precision = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    out.mkdir(parents=True, exist_ok=True)
    main(out, method, mode, precision)
