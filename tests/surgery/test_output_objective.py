"""objective="output": the rank-r factors that minimize each layer's output error on calibration data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_struct.nn import LowRankConv2d, LowRankLinear
from lightning_struct.ops import whiten as wh
from lightning_struct.surgery import ConversionOptions, convert


def _truncate(y: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(y, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix


def test_linear_factors_are_the_eckart_young_optimum_of_the_outputs():
    """X W_r^T equals the best rank-r approximation of X W^T (brute force: SVD of the outputs)."""
    x = _correlated(400, 24)
    w = torch.randn(16, 24, dtype=torch.float64)
    s = wh.whitening(x.T @ x, eps=0.0)
    for r in (1, 5, 12):
        first, second = wh.output_aware_factors(w, s, r)
        torch.testing.assert_close(x @ (second @ first).T, _truncate(x @ w.T, r), rtol=1e-8, atol=1e-8)
        # the whitened tail is the output error
        tail = wh.whitened_spectrum(w, s)[r:]
        err = torch.linalg.norm(x @ (w - second @ first).T)
        torch.testing.assert_close(err, tail.square().sum().sqrt(), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("cfg", [dict(padding=1), dict(padding=0, stride=2), dict(padding=2, dilation=2), dict(padding=1, padding_mode="reflect")])
def test_conv_channel_factors_are_optimal_on_the_patches(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, bias=True, **cfg).double()
    x = torch.randn(8, 6, 9, 11, dtype=torch.float64)
    model = nn.Sequential(conv)
    r = 4
    convert(model, "lowrank", rank=r, include="*", calibration=x, objective="output", min_saving=0.0)
    low = model[0]
    assert isinstance(low, LowRankConv2d)
    bias = conv.bias.detach()[None, :, None, None]
    got = low(x) - bias
    ref_full = conv(x) - bias  # (B, N, H', W') -> rows (B*H'*W', N), truncated, back
    b, n, h, w_ = ref_full.shape
    rows = ref_full.permute(0, 2, 3, 1).reshape(-1, n)
    ref = _truncate(rows, r).reshape(b, h, w_, n).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_output_objective_beats_weight_objective_at_equal_rank_and_reports_both_errors():
    torch.manual_seed(0)
    x = _correlated(512, 32).float()
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    reports = {}
    for obj in ("weight", "output"):
        m = copy.deepcopy(net)
        reports[obj] = convert(m, "lowrank", rank=6, include=["0", "2"], calibration=x, objective=obj, min_saving=0.0)
        assert all(isinstance(m[i], LowRankLinear) for i in (0, 2))
    for a, b in zip(reports["weight"].layers, reports["output"].layers):
        assert b.output_rel_error < a.output_rel_error  # the objective it minimizes
        assert b.weight_rel_error >= a.weight_rel_error - 1e-6  # and the one it does not
        assert b.detail["objective"] == "output"
    assert reports["output"].output_rel_error < reports["weight"].output_rel_error


def test_output_objective_refuses_what_it_cannot_do():
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match="needs at least 27 calibration rows"):  # 3*3*3 inputs, 4 patches
        convert(nn.Sequential(nn.Conv2d(3, 8, 3, stride=8)), "lowrank", rank=2, include="*", calibration=x[:, :, :8, :8], objective="output")
    with pytest.raises(ValueError, match="groups=1"):
        convert(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), "lowrank", rank=2, include="*", calibration=torch.randn(16, 4, 8, 8), objective="output")
    with pytest.raises(ValueError, match="pass calibration="):
        convert(nn.Sequential(nn.Linear(8, 8)), "lowrank", rank=2, include="*", input_size=(8,), objective="output")
    with pytest.raises(ValueError, match="scheme='channel'"):
        ConversionOptions(method="lowrank", rank=2, scheme="tucker2", objective="output")
    with pytest.raises(ValueError, match="objective"):
        ConversionOptions(method="lowrank", rank=2, objective="activations")


# ----------------------------------------------------------------------------- evidence on digits
@pytest.fixture(scope="module")
def digits():
    from lightning_struct.bench.deploy import train_digits_with_force
    from lightning_struct.data import DigitsDataModule

    dm = DigitsDataModule(image_size=8, batch_size=64, seed=0)
    dm.setup("fit")
    x, y = (torch.cat(t) for t in zip(*[(b[0], b[1]) for b in dm.val_dataloader()]))
    calibration = torch.cat([b[0] for _, b in zip(range(8), dm.train_dataloader())])
    nets = {"force": train_digits_with_force(epochs=8, strength=1e-4), "plain": train_digits_with_force(epochs=8, strength=0.0)}
    return dm, nets, calibration, x, y


def _acc(net, x, y):
    with torch.no_grad():
        return float((net.eval()(x).argmax(-1) == y).float().mean())


def _finetune_one_epoch(net, dm):
    import lightning.pytorch as pl

    from lightning_struct.models import ImageClassifier

    model = ImageClassifier(net, num_classes=10)
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(model, datamodule=dm)  # fmt: skip
    return model.net


@pytest.mark.slow
def test_output_objective_keeps_more_accuracy_at_the_same_parameter_count(digits):
    """Measured (seed 0, 8 epochs, 2-core CPU; val top-1 right after conversion, no fine-tuning):

    =========  ======  ==============  ==============
    net        budget  weight          output
    =========  ======  ==============  ==============
    force      0.3     9.75%           95.54%
    force      0.5     94.43%          96.66%
    no force   0.3     98.05%          99.16%
    no force   0.5     99.44%          99.44%
    =========  ======  ==============  ==============

    Asserted: at 30% of the selected layers' parameters "output" is >= 1 point better on both
    nets, at 50% it is no worse, and after one fine-tuning epoch (30%) it is no worse either.
    """
    dm, nets, cal, x, y = digits
    for label, net in nets.items():
        acc = {}
        for budget in (0.3, 0.5):
            for obj in ("weight", "output"):
                m = copy.deepcopy(net)
                r = convert(m, "lowrank", budget=budget, budget_on="params", calibration=cal, objective=obj, min_saving=0.0)
                acc[budget, obj] = _acc(m, x, y)
                if budget == 0.3:
                    acc["params", obj] = r.params_after
                    acc["ft", obj] = _acc(_finetune_one_epoch(m, dm), x, y)
        assert abs(acc["params", "output"] - acc["params", "weight"]) <= 0.02 * acc["params", "weight"], acc
        assert acc[0.3, "output"] >= acc[0.3, "weight"] + 0.01, (label, acc)
        assert acc[0.5, "output"] >= acc[0.5, "weight"], (label, acc)
        assert acc["ft", "output"] >= acc["ft", "weight"] - 1.0 / len(y), (label, acc)
