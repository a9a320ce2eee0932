"""StructuredConversion (single device, inside one fit) and the two-phase form (DDP)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_struct.callbacks.conversion import ConversionCheckpoint, StructuredConversion
from lightning_struct.callbacks.two_phase import fit_convert_finetune
from lightning_struct.data import DigitsDataModule
from lightning_struct.models import ImageClassifier
from lightning_struct.models.factories import digits_cnn
from lightning_struct.nn import LowRankConv2d, LowRankLinear
from lightning_struct.surgery import SPEC_KEY, get_spec, load_converted

REPO = Path(__file__).resolve().parents[2]
NET_KW = dict(image_size=8, widths=(8, 16, 16), hidden=32)
INCLUDE = ["net.features.conv2", "net.features.conv3", "net.classifier.fc1", "net.classifier.fc2"]


def _model(lr: float = 3e-3, scheduler=None) -> ImageClassifier:
    return ImageClassifier(
        digits_cnn(**NET_KW), num_classes=10, optimizer=partial(torch.optim.Adam, lr=lr), scheduler=scheduler
    )


def _dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=128, image_size=8, seed=0)


def _trainer(tmp_path: Path, max_epochs: int, callbacks: list[Callback], **kw) -> pl.Trainer:
    # no monitor: Lightning 2.6 refreshes last.ckpt only when a top-k checkpoint is written
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, ckpt],
        default_root_dir=tmp_path,
        **kw,
    )


class _Snapshot(Callback):
    """Records the optimizer's parameters and LR, and the weights, at the start of each epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, dict] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        # runs after StructuredConversion (callbacks run in list order)
        opt = trainer.optimizers[0]
        self.seen[trainer.current_epoch] = {
            "opt_params": {id(p) for g in opt.param_groups for p in g["params"]},
            "model_params": {id(p) for p in pl_module.parameters()},
            "lr": opt.param_groups[0]["lr"],
            "state": {k: v.clone() for k, v in pl_module.state_dict().items()},
        }


@pytest.mark.slow
def test_single_device_convert_inside_fit_trains_the_factors_and_reloads(tmp_path):
    pl.seed_everything(0)
    model = _model(scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    cb = StructuredConversion("lowrank", at_epoch=2, rank=4, include=INCLUDE, lr_scale=0.1)
    snap = _Snapshot()
    trainer = _trainer(tmp_path, 4, [cb, snap], limit_train_batches=4)
    trainer.fit(model, _dm())

    assert cb.converted and cb.report is not None and len(cb.report.converted) == 4
    assert isinstance(model.net.features.conv2, LowRankConv2d) and isinstance(
        model.net.classifier.fc1, LowRankLinear
    )
    # the re-created optimizer holds exactly the converted model's parameters
    for epoch in (2, 3):
        assert snap.seen[epoch]["opt_params"] == snap.seen[epoch]["model_params"]
    assert snap.seen[1]["opt_params"] != snap.seen[2]["opt_params"]
    # LR: 3e-3 * 0.5**2 (schedule continued to epoch 2) * 0.1 (lr_scale)
    assert snap.seen[2]["lr"] == pytest.approx(3e-3 * 0.25 * 0.1)
    assert snap.seen[3]["lr"] == pytest.approx(3e-3 * 0.125 * 0.1)
    # the factors were trained during fine-tuning
    final = model.state_dict()
    key = "net.features.conv2.first.weight"
    assert not torch.equal(snap.seen[2]["state"][key], final[key])

    # every later checkpoint carries the spec; the last one reloads into a fresh dense model
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert [e["name"] for e in last[SPEC_KEY]["layers"]] == INCLUDE
    assert last["callbacks"][cb.state_key]["converted"] is True
    val_acc = float(trainer.callback_metrics["val/acc"])

    # a fresh process rebuilds the structure and reproduces the validation accuracy exactly
    script = f"""
import json, torch, lightning.pytorch as pl
from lightning_struct.surgery import load_converted
from lightning_struct.data import DigitsDataModule
from lightning_struct.models import ImageClassifier
from lightning_struct.models.factories import digits_cnn
model = ImageClassifier(digits_cnn(image_size=8, widths=(8, 16, 16), hidden=32), num_classes=10)
load_converted({str(tmp_path / "ckpt" / "last.ckpt")!r}, model)
t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
out = t.validate(model, DigitsDataModule(batch_size=128, image_size=8, seed=0), verbose=False)
print("RESULT", json.dumps(out[0]["val/acc"]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    assert json.loads(line.split(" ", 1)[1]) == val_acc

    # resuming the converted run from its checkpoint on a dense model rebuilds the structure
    # before the weights (and the optimizer state) load, and does not convert again
    pl.seed_everything(0)
    resumed = _model(scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    cb2 = StructuredConversion("lowrank", at_epoch=2, rank=4, include=INCLUDE, lr_scale=0.1)
    snap2 = _Snapshot()
    t2 = _trainer(tmp_path / "resume", 5, [cb2, snap2], limit_train_batches=4)
    t2.fit(resumed, _dm(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert cb2.converted and cb2.report is None  # restored, not re-converted
    assert isinstance(resumed.net.features.conv2, LowRankConv2d)
    assert snap2.seen[4]["lr"] == pytest.approx(3e-3 * 0.0625 * 0.1)  # optimizer + scheduler state restored
    assert get_spec(resumed) == last[SPEC_KEY]


def test_callback_refuses_ddp_and_late_epochs(tmp_path):
    cb = StructuredConversion("lowrank", at_epoch=1, energy=0.95)
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False, max_epochs=3)
    with pytest.raises(MisconfigurationException, match="two-phase form"):
        cb.setup(trainer, _model(), "fit")
    late = StructuredConversion("lowrank", at_epoch=3, energy=0.95)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_epochs=3)
    with pytest.raises(MisconfigurationException, match="at_epoch=3"):
        late.setup(trainer, _model(), "fit")


def test_callback_argument_validation():
    with pytest.raises(ValueError, match="method='svd'"):
        StructuredConversion("svd")
    with pytest.raises(ValueError, match="exactly one rank rule"):
        StructuredConversion("lowrank", energy=0.9, ratio=0.5)
    with pytest.raises(ValueError, match="at_epoch=-1"):
        StructuredConversion("lowrank", at_epoch=-1, energy=0.9)
    with pytest.raises(ValueError, match="lr_scale=0"):
        StructuredConversion("lowrank", energy=0.9, lr_scale=0)
    with pytest.raises(ValueError, match="scheduler='keep'"):
        StructuredConversion("lowrank", energy=0.9, scheduler="keep")
    with pytest.raises(ValueError, match="unknown conversion key.*did you mean 'acdc_steps'"):
        StructuredConversion("lowrank", energy=0.9, acdc_stepz=3)


def test_selection_is_checked_at_fit_start_not_at_the_conversion_epoch():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_epochs=30)
    typo = StructuredConversion("lowrank", at_epoch=20, energy=0.9, include="net.featurez.*")
    with pytest.raises(ValueError, match="match no"):
        typo.setup(trainer, _model(), "fit")
    model = _model()
    conv = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    acdc = StructuredConversion("acdc", at_epoch=20, include=[conv])
    with pytest.raises(ValueError, match="ACDC replaces only"):
        acdc.setup(trainer, model, "fit")
    assert get_spec(model) is None  # nothing was converted by the check


class _DumpWeights(Callback):
    """Every rank writes its final weights (to compare ranks after a DDP fit)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_two_phase_under_ddp_spawn_keeps_ranks_identical(tmp_path):
    """fit (2-process gloo) -> convert in the main process -> fine-tune (2-process gloo)."""
    pl.seed_everything(0)
    model = _model()
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    converted_state: dict = {}

    def factory(phase: str, extra: list[Callback]) -> pl.Trainer:
        cbs = list(extra)
        if phase == "finetune":
            converted_state.update({k: v.clone() for k, v in model.state_dict().items()})
            cbs.append(_DumpWeights(dumps))
        return pl.Trainer(
            strategy="ddp_spawn",
            accelerator="cpu",
            devices=2,
            max_epochs=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_train_batches=3,
            limit_val_batches=1,
            callbacks=[*cbs, ModelCheckpoint(dirpath=tmp_path / phase, save_last=True)],
            default_root_dir=tmp_path / phase,
        )

    result = fit_convert_finetune(
        factory, model, _dm(), {"method": "lowrank", "rank": 4, "include": INCLUDE}, lr_scale=0.5
    )
    assert result.report is not None and len(result.report.converted) == 4
    r0 = torch.load(dumps / "rank0.pt", weights_only=True)
    r1 = torch.load(dumps / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys() and "net.features.conv2.first.weight" in r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical on both ranks
    # fine-tuning changed the factors (the ranks saw different data, the reducer averaged them)
    assert not torch.equal(
        r0["net.features.conv2.first.weight"], converted_state["net.features.conv2.first.weight"]
    )
    # the main process got rank 0's weights back into its (converted) model
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), r0[k]), k
    # and the fine-tuning checkpoint carries the spec
    ck = torch.load(tmp_path / "finetune" / "last.ckpt", weights_only=True)
    assert ck[SPEC_KEY]["layers"][0]["name"] == "net.features.conv2"
    fresh = _model()
    load_converted(tmp_path / "finetune" / "last.ckpt", fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, r0[k]), k


@pytest.mark.slow
def test_conversion_checkpoint_scales_lr_and_rebuilds_for_validate(tmp_path):
    """The two-phase fine-tuning callback on a single device: LR scale, spec, validate(ckpt_path)."""
    pl.seed_everything(0)

    def factory(phase: str, extra: list[Callback]) -> pl.Trainer:
        return _trainer(tmp_path / phase, 1, list(extra), limit_train_batches=2, limit_val_batches=1)

    model = _model(lr=1e-3)
    seen = {}

    class _LR(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]

    def factory2(phase: str, extra: list[Callback]) -> pl.Trainer:
        return factory(phase, [*extra, _LR()])

    res = fit_convert_finetune(
        factory2, model, _dm(), {"method": "lowrank", "ratio": 0.25, "include": INCLUDE}, lr_scale=0.1
    )
    assert seen["lr"] == pytest.approx(1e-4)
    assert res.fit_trainer is not None and "val/acc" in res.dense_metrics
    # a dense model validated from the converted checkpoint through a Trainer with the callback
    fresh = _model()
    t = _trainer(tmp_path / "val", 1, [ConversionCheckpoint()])
    out = t.validate(fresh, _dm(), ckpt_path=tmp_path / "finetune" / "ckpt" / "last.ckpt", verbose=False)
    assert isinstance(fresh.net.features.conv2, LowRankConv2d)
    assert out[0]["val/acc"] == pytest.approx(float(res.finetune_trainer.callback_metrics["val/acc"]), abs=0)


@pytest.mark.slow
def test_two_phase_output_objective_uses_every_calibration_batch_and_says_how_to_resume(tmp_path):
    """fc1 takes 64 inputs: the output objective needs 64 calibration rows, i.e. 4 batches of 16.
    The phase's calibration_batches decides (the options' own cap of 2 must not drop batches);
    too few batches fail after the dense phase with the command that converts its checkpoint."""
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=16, image_size=8, seed=0)

    def factory(phase: str, extra: list[Callback]) -> pl.Trainer:
        return _trainer(tmp_path / phase, 1, list(extra), limit_train_batches=4, limit_val_batches=1)

    opts = {"method": "lowrank", "rank": 4, "include": INCLUDE, "objective": "output", "sequential": True, "calibration_batches": 2}
    res = fit_convert_finetune(factory, _model(), dm, opts, calibration_batches=4)
    assert res.report is not None and len(res.report.converted) == 4
    assert all(r.detail["sequential"] for r in res.report.converted)
    with pytest.raises(ValueError, match=r"pass at least 4 batches like these[\s\S]*conversion\.fit=false conversion\.init_ckpt=\S+last\S*\.ckpt"):
        fit_convert_finetune(factory, _model(), dm, opts, calibration_batches=2)
