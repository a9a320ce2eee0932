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


# ----------------------------------------------------------------------------------------------
# --compare A B
# ----------------------------------------------------------------------------------------------
def _write_checkpoint(path, net_cfg: dict, seed: int, scale: float = 1.0, image_size: int = 16):
    """A checkpoint as `lightning-struct train` writes it (state_dict, plain hyper-parameters and
    the run config `load_classifier` rebuilds the net from), without training; weights times `scale`."""
    from hydra.utils import instantiate

    from lightning_struct.models import ImageClassifier

    torch.manual_seed(seed)
    model = ImageClassifier(instantiate(net_cfg), num_classes=3)
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(scale)
    run_config = {"task_name": "tiny", "data": {"image_size": image_size}, "model": {"num_classes": 3, "net": net_cfg}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "run_config": run_config,
         "epoch": 0, "global_step": 4},
        path,
    )  # fmt: skip
    return path


DIGITS = {"_target_": "lightning_struct.models.digits_cnn", "num_classes": 3, "image_size": 16, "widths": [4, 8, 8], "hidden": 16}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two tiny digits CNNs: runs/with_force (seed 0) and runs/without_force (seed 1, weights x1.5)."""
    root = tmp_path_factory.mktemp("compare")
    a = _write_checkpoint(root / "runs" / "with_force" / "checkpoints" / "last.ckpt", DIGITS, seed=0)
    b = _write_checkpoint(root / "runs" / "without_force" / "checkpoints" / "last.ckpt", DIGITS, seed=1, scale=1.5)
    return a, b


def test_compare_writes_csv_png_html_matching_analyse(two_checkpoints, tmp_path, capsys):
    import base64

    from lightning_struct.app.spectra import COMPARE_STATS, analyse
    from lightning_struct.models import load_classifier

    a, b = two_checkpoints
    out = tmp_path / "cmp"
    assert main(["--compare", str(a), str(b), f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "with_force vs without_force at 16x16" in printed and str(out / "compare.html") in printed
    rows = list(csv.DictReader((out / "compare.csv").open()))
    ref_a, _ = analyse(load_classifier(str(a)).net, (16, 16))
    ref_b, _ = analyse(load_classifier(str(b)).net, (16, 16))
    assert [r["layer"] for r in rows] == [r["layer"] for r in ref_a] == [r["layer"] for r in ref_b]
    for row, ra, rb in zip(rows, ref_a, ref_b):
        assert row["present"] == "both" and row["input_size_A"] == ra["input_size"]
        for k in COMPARE_STATS:
            assert float(row[f"{k}_A"]) == pytest.approx(ra[k], rel=1e-6)
            assert float(row[f"{k}_B"]) == pytest.approx(rb[k], rel=1e-6)
        assert float(row["sigma_max_B_over_A"]) == pytest.approx(rb["sigma_max"] / ra["sigma_max"], rel=1e-6)
        assert float(row["stable_rank_B_over_A"]) == pytest.approx(rb["stable_rank"] / ra["stable_rank"], rel=1e-6)
    png = (out / "compare.png").read_bytes()
    assert len(png) > 10_000
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," + base64.b64encode(png).decode()[:200] in page
    assert "<table>" in page and "features.conv2" in page and str(a.resolve()) in page and "--compare" in page


def test_compare_lists_layers_present_in_one_net_only(tmp_path, capsys):
    seq = lambda *mods: {"_target_": "torch.nn.Sequential", "_args_": list(mods)}  # noqa: E731
    conv = lambda i, o: {"_target_": "torch.nn.Conv2d", "in_channels": i, "out_channels": o, "kernel_size": 3, "padding": 1}  # noqa: E731
    tail = [{"_target_": "torch.nn.AdaptiveAvgPool2d", "output_size": 1}, {"_target_": "torch.nn.Flatten"}]
    a = _write_checkpoint(tmp_path / "a.ckpt", seq(conv(1, 4), *tail, {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3}), 0, image_size=8)
    b = _write_checkpoint(tmp_path / "b.ckpt", seq(conv(1, 4), conv(4, 4), *tail, {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3}), 0, image_size=8)
    out = tmp_path / "cmp"
    assert main(["--compare", str(a), str(b), "labels=small,big", f"out={out}"]) == 0
    rows = {r["layer"]: r for r in csv.DictReader((out / "compare.csv").open())}
    # A: 0 conv, 3 linear; B: 0 conv, 1 conv, 4 linear -> "1" and "4" only in B, "3" only in A
    assert {k: r["present"] for k, r in rows.items()} == {"0": "both", "1": "B only", "3": "A only", "4": "B only"}
    assert rows["1"]["sigma_max_A"] == "" and float(rows["1"]["sigma_max_B"]) > 0 and rows["1"]["sigma_max_B_over_A"] == ""
    printed = capsys.readouterr().out
    assert "only in A (small): 3" in printed and "only in B (big): 1, 4" in printed
    assert "only in B (big): 1, 4" in (out / "compare.html").read_text()


@pytest.mark.parametrize(
    "tail,msg",
    [
        (["--compare", "{a}"], "two checkpoint paths A B, got 1"),
        (["--compare", "{a}", "out=x"], "two checkpoint paths A B, got 1"),
        (["--compare", "{a}", "{missing}"], "B: '{missing}' does not exist"),
        (["--compare", "{a}", "{b}", "model=resnet18"], "model= cannot be combined with --compare"),
        (["--compare", "{a}", "{b}", "foo=1"], "unknown key (with --compare) ['foo']"),
        (["--compare", "{a}", "{b}", "{a}"], "would be a third"),
        (["--compare", "{a}", "{b}", "labels=x"], "labels='x': expected two different names"),
        (["--compare", "{a}", "{b}", "stats=all"], "stats"),
        (["--compare", "{a}", "{notckpt}"], "B: '{notckpt}' is not a readable `lightning-struct train` checkpoint"),
    ],
)
def test_compare_bad_arguments_exit_2_with_a_clear_message(two_checkpoints, tmp_path, capsys, tail, msg):
    a, b = two_checkpoints
    notckpt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, notckpt)
    names = {"a": str(a), "b": str(b), "missing": str(tmp_path / "missing.ckpt"), "notckpt": str(notckpt)}
    argv = [t.format(**names) for t in tail]
    assert main(argv) == 2
    assert msg.format(**names) in capsys.readouterr().err


def test_compare_default_labels():
    from lightning_struct.app.spectra import default_labels

    assert default_labels("runs/with_force/checkpoints/last.ckpt", "runs/no_force/checkpoints/last.ckpt") == ("with_force", "no_force")
    assert default_labels("ck/epoch=000-step=10.ckpt", "ck/last.ckpt") == ("epoch=000-step=10", "last")
    assert default_labels("r1/checkpoints/epoch=0.ckpt", "r2/checkpoints/last.ckpt") == ("r1/epoch=0", "r2/last")
    assert default_labels("x/last.ckpt", "x/last.ckpt") == ("A", "B")


def test_help_shows_compare_usage(capsys):
    assert main(["--help"]) == 0
    assert "--compare A.ckpt B.ckpt" in capsys.readouterr().out
