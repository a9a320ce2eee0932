"""`lightning-struct spectra` on a named model and on a checkpoint; spectra recipes run."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers import make_image_folder, run_cli, run_train

from lightning_struct.app.spectra import main, parse_args
from lightning_struct.ops.spectral import conv_spectral_norm

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]


def test_named_model_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["model=resnet18", "input_size=32", f"out={out}", "include=layer1.*,conv1"]) == 0
    rows = list(csv.DictReader((out / "spectra.csv").open()))
    names = [r["layer"] for r in rows]
    assert names == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    by = {r["layer"]: r for r in rows}
    assert by["conv1"]["input_size"] == "32x32" and by["layer1.0.conv1"]["input_size"] == "8x8"
    assert (out / "spectra.png").stat().st_size > 10_000
    assert "layer1.0.conv2" in capsys.readouterr().out


def test_norm_mode_matches_exact_norm_and_selection_keeps_input_channels():
    import torchvision

    from lightning_struct.app.spectra import analyse

    net = torchvision.models.resnet18(weights=None)
    rows, values = analyse(net, (16, 16), include=["layer2.0.conv1"], stats="norm")
    (row,) = rows
    assert row["input_size"] == "4x4" and values == {}
    ref = conv_spectral_norm(net.layer2[0].conv1.weight.detach().double(), (4, 4), stride=2)
    assert row["sigma_max"] == pytest.approx(float(ref), rel=1e-3)


@pytest.mark.parametrize(
    "argv,msg",
    [([], "exactly one"), (["model=resnet18", "ckpt=x"], "exactly one"), (["model=resnet18", "foo=1"], "unknown key"),
     (["resnet18"], "key=value"), (["model=resnet18", "stats=all"], "stats")],
)
def test_bad_arguments(argv, msg):
    with pytest.raises(ValueError, match=msg):
        parse_args(argv)


@pytest.mark.slow
def test_checkpoint_via_installed_command(tmp_path):
    run_train(["recipe=quickstart", "logger=none", "test=false", "trainer.max_epochs=1", *QUIET], tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    res = run_cli(["spectra", f"ckpt={ckpt}", f"out={tmp_path / 'sp'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["layer"]: r for r in csv.DictReader((tmp_path / "sp" / "spectra.csv").open())}
    assert rows["features.conv2"]["input_size"] == "16x16"  # the run's data.image_size
    w = torch.load(ckpt, weights_only=True)["state_dict"]["net.features.conv2.weight"]
    assert float(rows["features.conv2"]["sigma_max"]) == pytest.approx(float(conv_spectral_norm(w.double(), (16, 16))), rel=1e-4)
    bad = run_cli(["spectra", f"ckpt={tmp_path / 'missing.ckpt'}"], cwd=tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.slow
def test_quickstart_spectra_recipe_writes_pngs(tmp_path):
    metrics = run_train(
        ["recipe=quickstart_spectra", "logger=csv", "test=false", "trainer.max_epochs=1", *QUIET], tmp_path
    )
    assert metrics["val/acc"] > 0.5
    assert (tmp_path / "spectra" / "epoch_000.png").is_file()
    header = next(csv.reader((tmp_path / "metrics.csv").open()))
    assert "spectral/net.features.conv1/sigma_max" in header and "spectral/time_s" in header


@pytest.mark.slow
def test_vanbetteray_recipe_fast_dev_run(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=2, size=40)
    run_train(
        [
            "recipe=vanbetteray2025/resnet50_spectra", f"data.root={root}", "data.image_size=32", "data.batch_size=2",
            "data.num_workers=0", "model.num_classes=3", "trainer=cpu", "trainer.precision=32-true",
            "trainer.fast_dev_run=true", "logger=none", *QUIET,
        ],
        tmp_path / "run",
    )


def test_method_key(tmp_path):
    assert parse_args(["model=resnet18", "method=gram"])["method"] == "gram"
    with pytest.raises(ValueError, match="method"):
        parse_args(["model=resnet18", "method=qr"])
