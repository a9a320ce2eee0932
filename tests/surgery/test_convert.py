"""convert / fold_back / load_converted on small nets, against hand-computed references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_struct.models import ImageClassifier
from lightning_struct.models.factories import digits_cnn
from lightning_struct.nn import LowRankConv2d, LowRankLinear
from lightning_struct.ops import factorize as fz
from lightning_struct.surgery import (
    SPEC_KEY,
    convert,
    fold_back,
    get_spec,
    load_converted,
    save_converted,
)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return digits_cnn(image_size=8, widths=(8, 16, 16), hidden=32)


def _make_low_rank(net: nn.Module, r: int = 2) -> None:
    """Replace every conv/linear weight by a random rank-r matrix (in the channel view)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                n = m.weight.shape[0]
                d = m.weight[0].numel()
                m.weight.copy_((torch.randn(n, r) @ torch.randn(r, d)).reshape(m.weight.shape) / d**0.5)
            elif isinstance(m, nn.Linear):
                o, i = m.weight.shape
                m.weight.copy_(torch.randn(o, r) @ torch.randn(r, i) / i**0.5)


X = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def test_energy_on_exactly_low_rank_weights_is_lossless_and_smaller():
    net = _net()
    _make_low_rank(net, r=2)
    ref = copy.deepcopy(net).eval()
    report = convert(net, "lowrank", energy=0.95, calibration=X, exclude="features.conv1")
    assert isinstance(report.params_before, int) and isinstance(report.params_after, int)
    assert report.params_after < report.params_before
    assert report.params_before == sum(p.numel() for p in ref.parameters())
    assert report.params_after == sum(p.numel() for p in net.parameters())
    conv = {r.name: r for r in report.layers}
    assert "features.conv1" not in conv
    for name in ("features.conv2", "features.conv3", "classifier.fc1", "classifier.fc2"):
        row = conv[name]
        assert row.status == "converted", row
        assert row.detail["rank"] <= 2
        assert row.weight_rel_error < 1e-5 and row.output_rel_error < 1e-5
    assert isinstance(net.features.conv2, LowRankConv2d) and isinstance(net.classifier.fc1, LowRankLinear)
    net.eval()
    torch.testing.assert_close(net(X), ref(X), rtol=1e-4, atol=1e-5)
    assert report.output_rel_error < 1e-5


def test_not_cheaper_stays_dense_and_model_untouched():
    net = _net()  # random init: 0.999 energy needs nearly full rank everywhere
    ref = copy.deepcopy(net)
    report = convert(net, "lowrank", energy=0.999)
    assert all(r.status.startswith("kept dense") for r in report.layers)
    assert report.params_after == report.params_before
    assert get_spec(net) is None
    for (n1, p1), (_, p2) in zip(net.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p1, p2), n1


def test_absolute_rank_ratio_and_scheme():
    net = _net()
    rep = convert(net, "lowrank", rank=3, include=["features.conv2", "classifier.fc2"], scheme="spatial")
    assert net.features.conv2.scheme == "spatial" and net.features.conv2.rank == 3
    assert net.classifier.fc2.rank == 3
    assert [r.name for r in rep.converted] == ["features.conv2", "classifier.fc2"]
    net = _net()
    convert(net, "lowrank", ratio=0.25, include="features.conv3", scheme="tucker2")
    assert net.features.conv3.rank == (4, 4)  # full ranks (16, 16)
    # weight error equals the discarded energy for the matrix schemes
    net = _net()
    w = net.features.conv3.weight.detach().clone()
    rep = convert(net, "lowrank", rank=5, include="features.conv3")
    s = fz.conv_spectrum(w, "channel")
    expect = float((s[:, 5:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
    assert rep.layers[0].weight_rel_error == pytest.approx(expect, rel=1e-5)


def test_per_layer_output_error_matches_manual_and_bn_stats_untouched():
    net = _net()
    net.train()
    bn_before = net.features.bn2.running_mean.clone()
    ref = copy.deepcopy(net).eval()
    acts = {}
    h = ref.features.conv3.register_forward_hook(lambda m, a, o: acts.update(x=a[0], y=o))
    with torch.no_grad():
        ref(X)
    h.remove()
    rep = convert(net, "lowrank", rank=4, include="features.conv3", calibration=(X, torch.zeros(32)))
    with torch.no_grad():
        y_low = net.features.conv3(acts["x"])
    expect = float((y_low - acts["y"]).norm() / acts["y"].norm())
    assert rep.layers[0].output_rel_error == pytest.approx(expect, rel=1e-4)
    assert torch.equal(net.features.bn2.running_mean, bn_before)  # calibration ran in eval mode
    assert net.training and net.features.conv3.training  # modes restored


def _manual_macs(net: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(m, a, o):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += m.weight.numel() * o.shape[-1] * o.shape[-2]
        else:
            total += m.weight.numel()

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net.eval()(x[:1])
    for h in hs:
        h.remove()
    return total


def test_flops_totals_against_hook_count():
    net = _net()
    before = _manual_macs(net, X)
    rep = convert(net, "lowrank", rank=2, include=["features.conv2", "classifier.fc1"], input_size=(1, 8, 8))
    assert rep.flops_before == before
    assert rep.flops_after == _manual_macs(net, X)  # the factor convs/linears counted by hooks
    assert rep.flop_ratio > 1


def test_budget_params_and_flops():
    net = _net()
    selected = ["features.conv2", "features.conv3", "classifier.fc1", "classifier.fc2"]
    dense = sum(sum(p.numel() for p in net.get_submodule(n).parameters()) for n in selected)
    rep = convert(net, "lowrank", budget=0.4, include=selected)
    after = sum(r.params_after for r in rep.layers)
    assert after <= 0.4 * dense
    assert after > 0.3 * dense  # the greedy fills the budget
    net = _net()
    with pytest.raises(ValueError, match="needs the input shape"):
        convert(net, "lowrank", budget=0.5, budget_on="flops", include=selected)
    rep = convert(net, "lowrank", budget=0.5, budget_on="flops", include=selected, input_size=(1, 8, 8))
    fl_dense = sum(r.flops_before for r in rep.layers)
    assert sum(r.flops_after for r in rep.layers) <= 0.5 * fl_dense
    with pytest.raises(ValueError, match="smallest achievable"):
        convert(_net(), "lowrank", budget=0.001, include=selected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method='svd'"):
        convert(_net(), "svd", energy=0.9)
    with pytest.raises(ValueError, match="exactly one rank rule"):
        convert(_net(), "lowrank", energy=0.9, rank=2)
    with pytest.raises(ValueError, match="exactly one rank rule"):
        convert(_net(), "lowrank")
    with pytest.raises(ValueError, match="include pattern"):
        convert(_net(), "lowrank", rank=2, include="features.nope*")
    with pytest.raises(ValueError, match="scheme='cp'"):
        convert(_net(), "lowrank", rank=2, scheme="cp")
    with pytest.raises(ValueError, match="budget_on='time'"):
        convert(_net(), "lowrank", budget=0.5, budget_on="time")
    with pytest.raises(ValueError, match="takes no rank rule"):
        convert(_net(), "tied", energy=0.9)


def test_second_conversion_does_not_enter_factor_layers():
    net = _net()
    convert(net, "lowrank", rank=2, include="features.conv2")
    rep = convert(net, "lowrank", rank=2)
    names = [r.name for r in rep.layers]
    assert not any(n.startswith("features.conv2") for n in names)
    spec = get_spec(net)
    assert [e["name"] for e in spec["layers"]][0] == "features.conv2"


def test_grouped_conv_model_converts_per_group():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=4)
    )
    x = torch.randn(2, 4, 9, 9)
    ref = copy.deepcopy(net)
    convert(net, "lowrank", rank=100)  # full rank is never cheaper -> dense
    assert isinstance(net[0], nn.Conv2d)
    rep = convert(net, "lowrank", rank=1, include="0")
    assert rep.converted and net[0].groups == 2 and net[0].first.groups == 2
    conv = LowRankConv2d.from_dense(ref[0])  # full rank grouped: exact
    torch.testing.assert_close(conv(x), ref[0](x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# spec, save / reload, fold back
# ----------------------------------------------------------------------------------------------
def _converted_lit() -> ImageClassifier:
    lit = ImageClassifier(_net(), num_classes=10)
    convert(lit, "lowrank", rank=3, include=["net.features.conv2", "net.classifier.fc*"], scheme="tucker2")
    with torch.no_grad():  # make the weights distinguishable from a fresh build
        for p in lit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return lit.eval()


def _lightning_style_ckpt(lit: ImageClassifier) -> dict:
    return {"state_dict": lit.state_dict(), SPEC_KEY: get_spec(lit), "epoch": 0}


def test_load_converted_into_lightning_module_and_bare_net(tmp_path):
    lit = _converted_lit()
    ckpt = _lightning_style_ckpt(lit)
    path = tmp_path / "m.ckpt"
    torch.save(ckpt, path)
    fresh = ImageClassifier(_net(seed=9), num_classes=10)
    load_converted(path, fresh)
    fresh.eval()
    torch.testing.assert_close(fresh(X), lit(X))
    bare = _net(seed=9)
    load_converted(path, bare)  # prefix "net." found automatically
    torch.testing.assert_close(bare.eval()(X), lit(X))
    bare2 = _net(seed=9)
    load_converted(ckpt, bare2, prefix="net.")
    torch.testing.assert_close(bare2.eval()(X), lit(X))
    # a file written from the bare net loads into the LightningModule's child
    save_converted(bare, tmp_path / "bare.pt")
    lit2 = ImageClassifier(_net(seed=3), num_classes=10)
    load_converted(tmp_path / "bare.pt", lit2)
    torch.testing.assert_close(lit2.eval()(X), lit(X))


def test_load_converted_errors(tmp_path):
    lit = _converted_lit()
    ckpt = _lightning_style_ckpt(lit)
    with pytest.raises(FileNotFoundError):
        load_converted(tmp_path / "missing.ckpt", _net())
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError):
        load_converted(ckpt, other)
    with pytest.raises(ValueError, match="does not start with prefix"):
        load_converted(ckpt, _net(), prefix="model.")
    wrong = ImageClassifier(digits_cnn(image_size=8, widths=(8, 16, 12), hidden=32), num_classes=10)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_converted(ckpt, wrong)


def test_fold_back_is_exact_and_reloads(tmp_path):
    lit = _converted_lit()
    y = lit(X)
    rep = fold_back(lit)
    assert {r.name for r in rep.layers} == {
        "net.features.conv2",
        "net.classifier.fc1",
        "net.classifier.fc2",
        "net.classifier.fc3",
    }
    assert not any(isinstance(m, (LowRankConv2d, LowRankLinear)) for m in lit.modules())
    torch.testing.assert_close(lit(X), y, rtol=1e-5, atol=1e-5)
    torch.save(_lightning_style_ckpt(lit), tmp_path / "f.ckpt")
    fresh = ImageClassifier(_net(seed=4), num_classes=10)
    load_converted(tmp_path / "f.ckpt", fresh)
    torch.testing.assert_close(fresh.eval()(X), y, rtol=1e-5, atol=1e-5)
    # fold on load
    lit = _converted_lit()
    fresh = ImageClassifier(_net(seed=4), num_classes=10)
    load_converted(_lightning_style_ckpt(lit), fresh, fold=True)
    assert isinstance(fresh.net.features.conv2, nn.Conv2d)
    torch.testing.assert_close(fresh.eval()(X), lit(X), rtol=1e-5, atol=1e-5)


def test_spec_is_plain_data_and_weights_only_loadable(tmp_path):
    lit = _converted_lit()
    path = tmp_path / "m.ckpt"
    torch.save(_lightning_style_ckpt(lit), path)
    ck = torch.load(path, weights_only=True)
    assert ck[SPEC_KEY]["layers"][0]["kind"] == "lowrank_conv2d"
    assert ck[SPEC_KEY]["layers"][0]["name"] == "net.features.conv2"


# ----------------------------------------------------------------------------------------------
# ACDC
# ----------------------------------------------------------------------------------------------
def test_acdc_distillation_fits_the_dense_layer_and_reloads(tmp_path):
    torch.manual_seed(0)
    net = _net()
    # a structured target the stack can represent well: a diagonal-ish map
    with torch.no_grad():
        net.classifier.fc2.weight.copy_(torch.eye(32) * 2 + 0.01 * torch.randn(32, 32))
    x = torch.randn(64, 1, 8, 8)
    rep = convert(
        net, "acdc", include="classifier.fc2", calibration=x, acdc_steps=150, acdc_factors=2, acdc_relu=False
    )
    row = rep.layers[0]
    assert row.status == "converted" and row.kind == "acdc_linear"
    assert row.params_after == 2 * 4 * 32 < row.params_before
    first, last = (float(v) for v in row.detail["fit_loss"].split("->"))
    assert last < 0.1 * first
    assert row.output_rel_error < 0.2
    lit = ImageClassifier(net, num_classes=10).eval()
    torch.save(_lightning_style_ckpt(lit), tmp_path / "a.ckpt")
    fresh = ImageClassifier(_net(seed=7), num_classes=10)
    load_converted(tmp_path / "a.ckpt", fresh)
    torch.testing.assert_close(fresh.eval()(X), lit(X))


def test_acdc_refuses_exactly_named_3x3_and_skips_globbed():
    with pytest.raises(ValueError, match="layer 'features.conv2' is a \\(3, 3\\) conv"):
        convert(_net(), "acdc", include="features.conv2")
    rep = convert(_net(), "acdc", include=["features.*", "classifier.fc2"], acdc_steps=2, acdc_factors=2)
    status = {r.name: r.status for r in rep.layers}
    assert status["features.conv2"] == "kept dense: not a plain 1x1 conv"
    assert status["classifier.fc2"] == "converted"
    assert "synthetic" in rep.layers[-1].detail["fit"]
    rep = convert(_net(), "acdc", include="classifier.fc2", acdc_steps=2)  # 12 factors: 1536 > 1056 params
    assert rep.layers[0].status == "kept dense: factorized cost not lower"


# ----------------------------------------------------------------------------------------------
# tied
# ----------------------------------------------------------------------------------------------
def _bottleneck_net(seed: int = 0) -> nn.Module:
    from lightning_struct.models.pe import digits_bottleneck_cnn

    torch.manual_seed(seed)
    net = digits_bottleneck_cnn(channels=(16, 32), image_size=8)
    with torch.no_grad():  # non-trivial BN statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("staged", [False, True])
def test_tied_conversion_saves_params_skips_downsampling_and_reloads(staged, tmp_path):
    from lightning_struct.nn.tied import TiedBottleneck

    net = _bottleneck_net()
    tieable = [
        n
        for n, m in net.named_modules()
        if type(m).__name__ == "Bottleneck" and m.conv1.in_channels == m.conv3.out_channels
    ]
    rep = convert(net, "tied", tied_staged=staged)
    status = {r.name: r.status for r in rep.layers}
    assert sorted(n for n, s in status.items() if s == "converted") == sorted(tieable)
    assert any(s.startswith("kept dense: cannot tie") for s in status.values())  # the downsampling block
    saved = rep.params_before - rep.params_after
    # per block: the expand conv (r x C); staged: plus one W per extra block of a stage
    blocks = [net.get_submodule(n) for n in tieable]
    expect = sum(b.weight.numel() for b in blocks)
    if staged:
        expect += sum(b.weight.numel() for b in blocks) // 2  # 2 blocks per stage: the second W is shared
    assert saved == expect
    assert sum(r.params_before - r.params_after for r in rep.layers) == saved
    assert all(isinstance(b, TiedBottleneck) for b in blocks)
    if staged:
        assert blocks[0].weight is blocks[1].weight
    ref = copy.deepcopy(net)
    x = torch.randn(4, 1, 8, 8)
    # reload into a fresh dense model: structure (and sharing) rebuilt, same function
    torch.save({"state_dict": net.state_dict(), SPEC_KEY: get_spec(net)}, tmp_path / "t.pt")
    fresh = _bottleneck_net(seed=5)
    load_converted(tmp_path / "t.pt", fresh)
    fresh.eval()
    torch.testing.assert_close(fresh(x), ref(x))
    fb = [fresh.get_submodule(n) for n in tieable]
    assert (fb[0].weight is fb[1].weight) == staged
    with pytest.raises(ValueError, match="cannot be tied"):
        convert(_bottleneck_net(), "tied", include="down")


def test_tied_vit_mlp_blocks():
    from torchvision.models.vision_transformer import VisionTransformer

    from lightning_struct.nn.tied import TiedMLP

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    rep = convert(vit, "tied", calibration=torch.randn(2, 3, 16, 16))
    assert len(rep.converted) == 2 and all(r.kind == "tied_mlp" for r in rep.converted)
    assert rep.params_before - rep.params_after == 2 * 16 * 8
    assert isinstance(vit.encoder.layers[0].mlp, TiedMLP)
    assert rep.output_rel_error is not None and rep.converted[0].output_rel_error is not None


def test_rank_multiple_rounds_up_and_keeps_energy():
    net = _net()
    s = fz.conv_spectrum(net.features.conv3.weight, "channel")
    r0 = fz.energy_rank(s, 0.5)
    rep = convert(net, "lowrank", energy=0.5, include="features.conv3", rank_multiple=8)
    r = rep.layers[0].detail["rank"]
    assert r % 8 == 0 and r0 <= r < r0 + 8
    with pytest.raises(ValueError, match="rank_multiple=0"):
        convert(_net(), "lowrank", energy=0.5, rank_multiple=0)
    with pytest.raises(ValueError, match="not budget"):
        convert(_net(), "lowrank", budget=0.5, rank_multiple=8)


def test_public_convert_is_callable_whatever_was_imported_first():
    import subprocess
    import sys

    code = (
        "import torch, lightning_struct.surgery.conversion, lightning_struct.callbacks.two_phase\n"
        "from lightning_struct import convert\n"
        "import lightning_struct\n"
        "from lightning_struct.models.factories import digits_cnn\n"
        "r = convert(digits_cnn(image_size=8, widths=(8, 16, 16), hidden=32), 'lowrank', rank=2)\n"
        "r2 = lightning_struct.convert(digits_cnn(image_size=8), 'lowrank', rank=2)\n"
        "print(type(r).__name__, type(r2).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ConversionReport ConversionReport"


def test_corrupted_or_truncated_checkpoint_names_the_file(tmp_path):
    path = save_converted(_net(), tmp_path / "m.pt")
    data = bytearray(path.read_bytes())
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"truncated\.pt.*not a readable checkpoint"):
        load_converted(bad, _net())
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x9a" * 64)
    with pytest.raises(ValueError, match=r"garbage\.ckpt.*not a readable checkpoint"):
        load_converted(garbage, _net())
