"""SpectralMonitor in a real Trainer: what it logs, where it looks, resume, NaN, W&B, clipping."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    cb = SpectralMonitor(every_n_steps=4, lipschitz="chain")
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
    # the epoch-end pass adds the ESD power-law metrics of the exact spectrum (per-frequency block: 16 x 8)
    from lightning_struct.ops.esd import esd_stats

    esd = esd_stats(exact, matrix_dim=max(conv2.out_channels, conv2.in_channels))
    assert last["spectral/net.features.conv2/alpha"] == pytest.approx(esd["alpha"], rel=1e-3)
    assert last["spectral/net.features.conv2/log_spectral_norm"] == pytest.approx(2 * math.log10(float(exact.max())), rel=1e-4)
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

    cb = SpectralMonitor(every_n_steps=2, full_every_n_epochs=None, lipschitz="chain")
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
    assert type(payload["spectral_trends/sigma_max all layers"]).__name__ == "CustomChart"
    assert isinstance(payload["spectral/heatmap"], wandb.Image) and isinstance(payload["spectral/over_time"], wandb.Image)
    assert "spectral/net.features.conv1/sigma_max" in payload
    assert "spectral/lipschitz_bound" not in payload  # a product that bounds nothing in general: opt-in
    # the run summary holds the final statistics, and summary.json the same without W&B
    summary = json.loads((tmp_path / "spectra" / "summary.json").read_text())
    assert summary["final"]["net.features.conv1"]["sigma_max"] == pytest.approx(payload["spectral/net.features.conv1/sigma_max"])
    assert cb.last_stats and logger.experiment is not None


def test_epoch_views_continue_after_a_resume_and_histograms_follow_their_period(tmp_path, monkeypatch):
    sent: list[dict] = []
    monkeypatch.setattr("lightning_struct.callbacks.spectral.log_wandb", lambda trainer, payload: sent.append(payload))
    monkeypatch.setattr("lightning_struct.callbacks.spectral.wandb_loggers", lambda trainer: [object()])
    cb = SpectralMonitor(every_n_steps=0, histogram_every_n_epochs=2)
    trainer, _ = _fit(tmp_path / "a", cb, steps=2, epochs=2)
    assert [any(k.startswith("spectral_hist/") for k in p) for p in sent] == [False, True]  # epochs 0, 1
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    cb2 = SpectralMonitor(every_n_steps=0, histogram_every_n_epochs=2)
    _fit(tmp_path / "b", cb2, steps=2, epochs=3, ckpt_path=ckpt)
    assert sorted(cb2.stats_history) == [0, 1, 2]  # the heatmap keeps the epochs before the resume
    assert sorted(cb2.trend) == [2, 4, 6]  # and the trend charts the steps (2 batches per epoch)
    assert list(cb2.history["net.features.conv2"]) == ["epoch 0", "epoch 1", "epoch 2"]
    for name in ("heatmap.png", "over_time.png", "epoch_002.png", "summary.json"):
        assert (tmp_path / "b" / "spectra" / name).is_file(), name


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
    assert set(state[key]) == {"last_step_logged", "last_clip_step", "input_sizes", "stats_history", "trend", "history"}
    assert state[key]["input_sizes"]["net.features.conv3"] == [4, 4]
    cb2 = SpectralMonitor(every_n_steps=5, full_every_n_epochs=None)
    trainer2, _ = _fit(tmp_path / "b", cb2, steps=4, epochs=2, ckpt_path=ckpt)
    steps = [s for s, m in trainer2.logger.records if "spectral/net.features.conv1/sigma_max" in m]
    assert steps == [5]  # continued counting from step 4: logs at 5, not again from 0
    assert cb2.input_sizes["net.features.conv1"] == (8, 8)


def test_state_dict_round_trip_and_old_checkpoints():
    cb = SpectralMonitor()
    state = {"last_step_logged": 7, "last_clip_step": 3, "input_sizes": {"conv": [8, 8]},
             "stats_history": {0: {"conv": {"sigma_max": 2.0}}}, "trend": {5: {"conv": {"sigma_max": 2.0}}},
             "history": {"conv": {"epoch 0": [2.0, 1.0]}}}  # fmt: skip
    cb.load_state_dict(state)
    assert cb.state_dict() == state
    old = SpectralMonitor()  # a checkpoint written before the epoch counter was dropped (and before the histories)
    old.load_state_dict({"last_step_logged": 4, "last_clip_step": -1, "epochs_done": 2, "input_sizes": {}})
    assert old.state_dict() == {"last_step_logged": 4, "last_clip_step": -1, "input_sizes": {}, "stats_history": {}, "trend": {}, "history": {}}


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


def test_residual_block_bounds_hold_and_follow_the_formula():
    """Each block's bound is at least its measured Lipschitz ratio on random pairs (eval mode),
    and equals shortcut + prod sigma_max * BN scale for a torchvision BasicBlock."""
    import torchvision

    from lightning_struct.callbacks.spectral import _bn_scale, residual_block_bounds
    from lightning_struct.ops.spectral import SUPPORTED_TYPES, model_spectra
    from lightning_struct.select import InputSizeRecorder, select_layers

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
    layers = select_layers(net, SUPPORTED_TYPES, None, None, what="test")
    with torch.no_grad(), InputSizeRecorder(layers) as rec:
        net(torch.zeros(1, 3, 32, 32))
    stats = {n: layer.stats for n, layer in model_spectra(layers, rec.sizes, stats="norm").items()}
    bounds = residual_block_bounds(net, stats)
    assert set(bounds) == {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}
    b = net.layer1[0]
    expect = 1.0 + stats["layer1.0.conv1"]["sigma_max"] * _bn_scale(b.bn1) * stats["layer1.0.conv2"]["sigma_max"] * _bn_scale(b.bn2)
    assert bounds["layer1.0"] == pytest.approx(expect)
    feats = {}
    net.layer2[0].register_forward_pre_hook(lambda m, a: feats.setdefault("x", a[0]))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
        x = feats["x"]
        bn_shift = net.layer2[0](x)  # a non-linear block: compare differences of outputs
        for _ in range(8):
            d = torch.randn_like(x) * 1e-2
            ratio = (net.layer2[0](x + d) - bn_shift).norm() / d.norm()
            assert float(ratio) <= bounds["layer2.0"] * (1 + 1e-5)
    assert all(b < 1e3 for b in bounds.values())  # per block: modest numbers, unlike the chain product
    # a CIFAR ResNet with option-B shortcuts: the projection is named <block>.shortcut.0 and counted
    from lightning_struct.models.resnet_cifar import resnet20

    cifar = resnet20(shortcut="B").eval()
    layers = select_layers(cifar, SUPPORTED_TYPES, None, None, what="test")
    with torch.no_grad(), InputSizeRecorder(layers) as rec:
        cifar(torch.zeros(1, 3, 32, 32))
    stats = {n: layer.stats for n, layer in model_spectra(layers, rec.sizes, stats="norm").items()}
    bounds = residual_block_bounds(cifar, stats)
    blk = cifar.layer2[0]
    shortcut = stats["layer2.0.shortcut.0"]["sigma_max"] * _bn_scale(blk.shortcut[1])
    branch = stats["layer2.0.conv1"]["sigma_max"] * _bn_scale(blk.bn1) * stats["layer2.0.conv2"]["sigma_max"] * _bn_scale(blk.bn2)
    assert len(bounds) == 9 and bounds["layer2.0"] == pytest.approx(shortcut + branch)
    assert bounds["layer1.0"] == pytest.approx(1.0 + stats["layer1.0.conv1"]["sigma_max"] * _bn_scale(cifar.layer1[0].bn1)
                                               * stats["layer1.0.conv2"]["sigma_max"] * _bn_scale(cifar.layer1[0].bn2))  # fmt: skip


def test_wandb_payload_of_a_53_layer_network_stays_small(tmp_path):
    """ResNet-50 (53 layers) at 32 px, 20 epochs of history and 128 trend steps: the epoch-end payload (three figures,
    tables, trend and spectrum charts, histograms) stays far below W&B's 10 MB per log call."""
    import torchvision

    from lightning_struct.callbacks.spectral import payload_bytes, wandb_payload
    from lightning_struct.ops.spectral import SUPPORTED_TYPES, model_spectra
    from lightning_struct.select import InputSizeRecorder, select_layers
    from lightning_struct.viz.spectra import (
        downsample_sorted,
        plot_spectra,
        plot_spectra_over_time,
        plot_stat_heatmaps,
    )

    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()
    layers = select_layers(net, SUPPORTED_TYPES, None, None, what="test")
    with torch.no_grad(), InputSizeRecorder(layers) as rec:
        net(torch.zeros(1, 3, 32, 32))
    spectra = model_spectra(layers, rec.sizes, stats="full")
    stats = {n: s.stats for n, s in spectra.items()}
    values = {n: s.values for n, s in spectra.items()}
    stats_history = {e: stats for e in range(20)}
    history = {n: {f"epoch {e}": downsample_sorted(v) for e in range(20)} for n, v in values.items()}
    figures = {
        "plot": plot_spectra(values, tmp_path / "p.png"),
        "heatmap": plot_stat_heatmaps(stats_history, tmp_path / "h.png"),
        "over_time": plot_spectra_over_time(history, tmp_path / "o.png"),
    }
    trend = {step: stats for step in range(0, 128 * 200, 200)}  # 128 passes: the cap
    payload = wandb_payload(stats, values, history, trend, rec.sizes, figures, histogram_bins=64)
    assert len(stats) == 54 and sum(k.startswith("spectral_trends/") for k in payload) == 12  # 6 stages x 2
    size = payload_bytes(payload)
    print("payload bytes", size)
    assert 10_000 < size < 3_000_000, size  # measured 2.4 MB (with histograms and 128 trend steps): a quarter of the 10 MB limit


def test_offline_wandb_run_is_readable_without_wandb(tmp_path):
    """Our WandbLogger leaves config.yaml and summary.json (with the monitor's final statistics) in
    the offline run's files/ directory, next to the .wandb file."""
    import wandb
    import yaml

    from lightning_struct.loggers import WandbLogger as OurWandbLogger

    logger = OurWandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    logger.log_hyperparams({"model": {"lr": 0.01}, "my_note": "offline check"})
    cb = SpectralMonitor(every_n_steps=0, full_every_n_epochs=1)
    try:
        _fit(tmp_path, cb, steps=2, logger=logger)
        files = Path(logger.experiment.dir)
    finally:
        wandb.finish()
    assert files.parent.name.startswith("offline-run-") and list(files.parent.glob("*.wandb"))
    config = yaml.safe_load((files / "config.yaml").read_text())
    assert config["model"] == {"lr": 0.01} and config["my_note"] == "offline check"
    summary = json.loads((files / "summary.json").read_text())
    conv1 = cb.last_stats["net.features.conv1"]["sigma_max"]
    assert summary["spectral_final/net.features.conv1/sigma_max"] == pytest.approx(conv1)
    assert summary["spectral/net.features.conv1/sigma_max"] == pytest.approx(conv1)  # last logged value
