"""The zero-padded operator norm against the explicit matrix; the monitor's boundary='both'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_struct.ops.spectral import conv_spectral_norm, explicit_conv_matrix, padded_conv_norm


@pytest.mark.parametrize(
    "ci,co,k,n,stride,groups",
    [(3, 5, 3, 6, 1, 1), (4, 6, 3, 8, 2, 1), (2, 3, 5, 8, 1, 1), (4, 4, 3, 6, 1, 2), (6, 4, 1, 5, 1, 1)],
)
def test_padded_norm_is_the_explicit_zero_padded_operator_norm(ci, co, k, n, stride, groups):
    torch.manual_seed(0)
    w = torch.randn(co, ci // groups, k, k, dtype=torch.float64)
    pad = (k - 1) // 2
    if stride == 1:
        ref = float(torch.linalg.svdvals(explicit_conv_matrix(w, (n, n), groups=groups, padding_mode="zeros")).max())
    else:  # the explicit matrix by unit inputs through F.conv2d with this padding
        eye = torch.eye(ci * n * n, dtype=torch.float64).reshape(-1, ci, n, n)
        ref = float(torch.linalg.svdvals(F.conv2d(eye, w, stride=stride, padding=pad, groups=groups).reshape(ci * n * n, -1)).max())
    got, v, used = padded_conv_norm(w, (n, n), stride=stride, padding=pad, groups=groups, tol=1e-10, max_iter=2000)
    assert got == pytest.approx(ref, rel=1e-8)
    assert v.shape == (1, ci, n, n) and used >= 1
    # a warm start from the previous vector needs at most one Lanczos cycle for a small change
    again, _, used_warm = padded_conv_norm(w * 1.001, (n, n), stride=stride, padding=pad, groups=groups, start=v)
    assert again == pytest.approx(1.001 * ref, rel=1e-5) and used_warm <= 22


def test_the_periodic_norm_overstates_small_zero_padded_maps():
    """A 3x3 conv on a 2x2 map: the zero-padded operator sees few taps; the periodic one all nine."""
    torch.manual_seed(0)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    gaps = {}
    for n in (2, 4, 16):
        padded, _, _ = padded_conv_norm(w, (n, n), padding=1, tol=1e-9, max_iter=1000)
        gaps[n] = float(conv_spectral_norm(w, (n, n))) / padded - 1
    assert gaps[2] > 0.2 and abs(gaps[16]) < 0.05 and gaps[2] > gaps[4] > abs(gaps[16]), gaps
    zero, _, _ = padded_conv_norm(torch.zeros(2, 2, 3, 3), (4, 4), padding=1)
    assert zero == 0.0


def test_monitor_logs_the_padded_norm_beside_the_periodic_one(tmp_path):
    import lightning.pytorch as pl

    from lightning_struct import SpectralMonitor
    from lightning_struct.data import DigitsDataModule
    from lightning_struct.models import ImageClassifier, digits_cnn

    torch.manual_seed(0)
    cb = SpectralMonitor(every_n_steps=2, full_every_n_epochs=None, boundary="both", step_stats="norm")
    model = ImageClassifier(digits_cnn(image_size=8, widths=(8, 16, 16), hidden=32), 10)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])  # fmt: skip
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=32))
    conv = model.net.features.conv3
    ref, _, _ = padded_conv_norm(conv.weight.detach().double(), cb.input_sizes["net.features.conv3"], padding=conv.padding, tol=1e-10)
    assert cb.last_stats["net.features.conv3"]["sigma_max_padded"] == pytest.approx(ref, rel=1e-4)
    assert "sigma_max_padded" not in cb.last_stats["net.classifier.fc1"]  # Linear: no boundary
    with pytest.raises(ValueError, match="boundary='zeros'; allowed: 'periodic', 'both'"):
        SpectralMonitor(boundary="zeros")
