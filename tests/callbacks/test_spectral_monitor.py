"""SpectralMonitor in a real Trainer: what it logs, where it looks, resume, NaN, W&B, clipping."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_struct import SpectralMonitor
from lightning_struct.data import DigitsDataModule
from lightning_struct.models import ImageClassifier, digits_cnn
from lightning_struct.ops.spectral import conv_singular_values, conv_spectral_norm


class _Capture(CSVLogger):
    """CSV logger that also keeps every logged dict in memory."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.records: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))
        super().log_metrics(metrics, step)


def _fit(tmp_path, cb, *, steps=8, epochs=1, logger=None, model=None, ckpt_path=None):
    torch.manual_seed(0)
    model = model or ImageClassifier(digits_cnn(image_size=8, widths=(8, 16, 16), hidden=32), 10)
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=logger if logger is not None else _Capture(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=ckpt_path is not None or epochs > 1,
        default_root_dir=tmp_path,
        callbacks=[cb],
    )
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=32), ckpt_path=ckpt_path)
    return trainer, model


def test_logs_exact_statistics_on_real_input_sizes(tmp_path):
    cb = SpectralMonitor(every_n_steps=4)
    trainer, model = _fit(tmp_path, cb)
    assert cb.input_sizes["net.features.conv1"] == (8, 8)
    assert cb.input_sizes["net.features.conv3"] == (4, 4)  # after the 2x2 pool
    steps = [s for s, m in trainer.logger.records if "spectral/net.features.conv2/sigma_max" in m]
    assert steps == [4, 8, 8]  # step 4, step 8, epoch end (also step 8)
    last = [m for _, m in trainer.logger.records if "spectral/net.features.conv2/sigma_max" in m][-1]
    conv2 = model.net.features.conv2
    exact = conv_singular_values(conv2.weight.detach().double(), (8, 8))
    assert last["spectral/net.features.conv2/sigma_max"] == pytest.approx(float(exact.max()), rel=1e-4)
    assert last["spectral/net.features.conv2/sigma_min"] == pytest.approx(float(exact.min()), rel=1e-3, abs=1e-6)
    s = exact
    assert last["spectral/net.features.conv2/stable_rank"] == pytest.approx(float((s**2).sum() / s.max() ** 2), rel=1e-4)
    # the reshape bound is an upper bound of the exact norm
    assert last["spectral/net.features.conv2/reshape_bound"] >= last["spectral/net.features.conv2/sigma_max"]
    prod = math.prod(v for k, v in last.items() if k.endswith("/sigma_max"))
    assert last["spectral/lipschitz_bound"] == pytest.approx(prod, rel=1e-5)
    assert last["spectral/time_s"] > 0
    assert cb.last_plot is not None and cb.last_plot.is_file() and cb.last_plot.suffix == ".png"


def test_norm_only_step_stats_use_fast_path(tmp_path):
    cb = SpectralMonitor(every_n_steps=3, step_stats="norm", full_every_n_epochs=None, include=["net.features.*"])
    trainer, model = _fit(tmp_path, cb, steps=3)
    (_, m), = [(s, m) for s, m in trainer.logger.records if any(k.startswith("spectral/") for k in m)]
    assert set(k.rsplit("/", 1)[-1] for k in m if k.startswith("spectral/net")) == {"sigma_max"}
    w = model.net.features.conv3.weight.detach()
    ref = float(conv_spectral_norm(w.double(), (4, 4)))
    assert m["spectral/net.features.conv3/sigma_max"] == pytest.approx(ref, rel=1e-3)
    assert cb.last_plot is None


def test_nan_weights_are_reported_not_fatal(tmp_path, caplog):
    model = ImageClassifier(digits_cnn(image_size=8, widths=(8, 16, 16), hidden=32), 10)

    class Poison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net.features.conv2.weight[0, 0, 0, 0] = float("nan")

    cb = SpectralMonitor(every_n_steps=2, full_every_n_epochs=None)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=_Capture(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[Poison(), cb],
    )
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=32))
    logged = {s: m for s, m in trainer.logger.records if "spectral/net.features.conv2/sigma_max" in m}
    # step 2: only conv2 is poisoned; afterwards NaN has spread through training to every layer
    assert math.isnan(logged[2]["spectral/net.features.conv2/sigma_max"])
    assert math.isfinite(logged[2]["spectral/net.features.conv1/sigma_max"])
    assert math.isnan(logged[4]["spectral/lipschitz_bound"])
    assert "NaN/inf" in caplog.text


def test_wandb_payloads_offline(tmp_path, monkeypatch):
    import wandb

    sent: list[dict] = []
    orig = WandbLogger.log_metrics

    def spy(self, metrics, step=None):
        sent.append(dict(metrics))
        return orig(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", spy)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    cb = SpectralMonitor(every_n_steps=0, full_every_n_epochs=1)
    try:
        _fit(tmp_path, cb, steps=2, logger=logger)
    finally:
        wandb.finish()
    payload = {k: v for d in sent for k, v in d.items()}
    assert isinstance(payload["spectral_hist/net.features.conv1"], wandb.Histogram)
    assert isinstance(payload["spectral/table"], wandb.Table)
    assert isinstance(payload["spectral/plot"], wandb.Image)
    assert type(payload["spectral_lines/net.features.conv2"]).__name__ == "CustomChart"
    assert "spectral/net.features.conv1/sigma_max" in payload


def test_clipping_bounds_operator_norm_on_every_step(tmp_path):
    cb = SpectralMonitor(every_n_steps=0, full_every_n_epochs=None, include=["net.features.conv2"],
                         max_norm=0.5, clip_every_n_steps=1, clip_n_iter=8)
    _, model = _fit(tmp_path, cb, steps=3)
    w = model.net.features.conv2.weight.detach().double()
    assert float(conv_spectral_norm(w, (8, 8))) <= 0.5 * 1.05


def test_resume_keeps_schedule_and_sizes(tmp_path):
    cb = SpectralMonitor(every_n_steps=5, full_every_n_epochs=None)
    trainer, _ = _fit(tmp_path / "a", cb, steps=4, epochs=1)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    (key,) = [k for k in state if "SpectralMonitor" in k]
    # exactly what load_state_dict reads (the epoch schedule follows trainer.current_epoch)
    assert set(state[key]) == {"last_step_logged", "last_clip_step", "input_sizes"}
    assert state[key]["input_sizes"]["net.features.conv3"] == [4, 4]
    cb2 = SpectralMonitor(every_n_steps=5, full_every_n_epochs=None)
    trainer2, _ = _fit(tmp_path / "b", cb2, steps=4, epochs=2, ckpt_path=ckpt)
    steps = [s for s, m in trainer2.logger.records if "spectral/net.features.conv1/sigma_max" in m]
    assert steps == [5]  # continued counting from step 4: logs at 5, not again from 0
    assert cb2.input_sizes["net.features.conv1"] == (8, 8)


def test_state_dict_round_trip_and_old_checkpoints():
    cb = SpectralMonitor()
    cb.load_state_dict({"last_step_logged": 7, "last_clip_step": 3, "input_sizes": {"conv": [8, 8]}})
    assert cb.state_dict() == {"last_step_logged": 7, "last_clip_step": 3, "input_sizes": {"conv": [8, 8]}}
    old = SpectralMonitor()  # a checkpoint written before the epoch counter was dropped
    old.load_state_dict({"last_step_logged": 4, "last_clip_step": -1, "epochs_done": 2, "input_sizes": {}})
    assert old.state_dict() == {"last_step_logged": 4, "last_clip_step": -1, "input_sizes": {}}


def test_bad_arguments_and_selection():
    with pytest.raises(ValueError, match=r"SpectralMonitor: every_n_steps=-1 must be None or an int >= 0"):
        SpectralMonitor(every_n_steps=-1)
    with pytest.raises(ValueError, match=r"SpectralMonitor: step_stats='all'; allowed: 'full', 'norm'"):
        SpectralMonitor(step_stats="all")
    with pytest.raises(ValueError, match="clip_every_n_steps=None; an int >= 1 is required with max_norm=1"):
        SpectralMonitor(max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm=0 must be None or a number > 0"):
        SpectralMonitor(max_norm=0, clip_every_n_steps=1)
    with pytest.raises(ValueError, match="histogram_bins=1000 must be an int >= 1 and <= 512"):
        SpectralMonitor(histogram_bins=1000)
    with pytest.raises(ValueError, match="clip_n_iter=0"):
        SpectralMonitor(clip_n_iter=0)
    with pytest.raises(ValueError, match="dtype=torch.float16; allowed: None, torch.float32, torch.float64"):
        SpectralMonitor(dtype=torch.float16)
    with pytest.raises(TypeError, match="plot='yes' must be a bool"):
        SpectralMonitor(plot="yes")
    with pytest.raises(TypeError, match="include must be None, a name glob or a list of globs"):
        SpectralMonitor(include=3)
    with pytest.raises(ValueError, match="types"):
        SpectralMonitor(types=["BatchNorm2d"])
    cb = SpectralMonitor(include=["net.features.bn1"])
    model = ImageClassifier(digits_cnn(), 10)
    with pytest.raises(ValueError, match="net.features.bn1.*BatchNorm2d"):
        cb.setup(pl.Trainer(logger=False), model, "fit")


def test_method_svd_resolves_small_singular_values():
    """Default method="svd": sigma_min / condition number exact in float32, where the Gram route
    only reaches its ~1e-3 sigma_max floor (a square random 64x64 conv is ill-conditioned)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    exact = conv_singular_values(conv.weight.detach().double(), (12, 12))
    rel = lambda a, b: abs(a - b) / b  # noqa: E731
    got = {}
    for method in ("svd", "gram"):
        cb = SpectralMonitor(method=method)
        cb.layers, cb.input_sizes = [("conv", conv)], {"conv": (12, 12)}
        stats, values = cb.compute(full=True)
        got[method] = stats["conv"]
        assert values["conv"].numel() == exact.numel()
    assert rel(got["svd"]["sigma_min"], float(exact.min())) < 1e-3
    assert rel(got["svd"]["condition_number"], float(exact.max() / exact.min())) < 1e-3
    assert rel(got["gram"]["sigma_max"], float(exact.max())) < 1e-5
    assert float(exact.min()) < 2e-3 * float(exact.max())  # ill-conditioned: near the float32 Gram floor
    with pytest.raises(ValueError, match="method='qr'"):
        SpectralMonitor(method="qr")
