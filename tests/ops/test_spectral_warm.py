"""Warm operator norms: the same values as the full spectrum, call after call, while the weights move."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_struct import SpectralMonitor
from lightning_struct.ops.spectral import (
    conv_spectrum,
    linear_spectrum,
    spectral_config,
    warm_conv_spectral_norm,
    warm_linear_norm,
)
from lightning_struct.ops.spectral.geometry import _geometry
from lightning_struct.ops.spectral.symbols import conv_symbol
from lightning_struct.ops.spectral.warm import _half_frequencies, _Operators

RTOL = 1e-4  # the bound against the full spectrum, float32

# (weight shape, input size, stride, dilation, groups): both Gram sides, strided, grouped, 1-D/3-D,
# 1x1 (one problem), and a small c (exact eigenvalues, pruned all the same)
CASES = [
    ((48, 40, 3, 3), (8, 8), 1, 1, 1),  # input side
    ((40, 48, 3, 3), (6, 10), 1, 1, 1),  # output side, non-square grid
    ((40, 20, 3, 3), (8, 8), 2, 1, 1),  # strided, output side (alias blocks)
    ((160, 20, 3, 3), (8, 8), 2, 1, 1),  # strided, input side (c = 4 * 20 = 80)
    ((80, 20, 3), (12,), 2, 2, 2),  # 1-D, dilated, grouped
    ((36, 36, 2, 3, 3), (4, 6, 6), (1, 2, 2), 1, 1),  # 3-D, anisotropic stride
    ((64, 48, 1, 1), (6, 6), 2, 1, 1),  # 1x1 strided
    ((16, 8, 3, 3), (8, 8), 1, 1, 1),  # c = 16: exact path
]


def _full(w, n, s, dil, g):
    return float(conv_spectrum(w.double(), n, stride=s, dilation=dil, groups=g).sigma_max)


@pytest.mark.parametrize("shape,n,s,dil,g", CASES)
def test_warm_norm_tracks_the_full_spectrum_while_weights_move(shape, n, s, dil, g):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    value, state = warm_conv_spectral_norm(w, n, stride=s, dilation=dil, groups=g)
    assert state.recomputed == state.frequencies  # cold
    assert float(value) == pytest.approx(_full(w, n, s, dil, g), rel=RTOL)
    for step, size in enumerate([1e-3, 1e-2, 1e-1, 1e-3]):
        w = w + size * w.norm() / w.numel() ** 0.5 * torch.randn_like(w)
        value, state = warm_conv_spectral_norm(w, n, stride=s, dilation=dil, groups=g, state=state)
        assert float(value) == pytest.approx(_full(w, n, s, dil, g), rel=RTOL), (step, size)
        assert state.weight is not None and torch.equal(state.weight, w) and state.nbytes() >= 4 * w.numel()


def test_operators_match_conv_symbol_on_every_geometry():
    """The matrix-free Gram action equals ``B B^H`` / ``B^H B`` of :func:`conv_symbol`'s symbols."""
    torch.manual_seed(1)
    for shape, n, s, dil, g in CASES:
        w = torch.randn(*shape, dtype=torch.float64)
        geom = _geometry(w, n, s, dil, g)
        one = all(k == 1 for k in geom.k)
        ops = _Operators(w, geom, torch.complex128, one)
        freqs = _half_frequencies(geom, w.device)[: 1 if one else None]
        sym, _ = conv_symbol(w, n, stride=s, dilation=dil, groups=g, dtype=torch.float64)
        B = sym[: len(freqs)].reshape(-1, *sym.shape[-2:])
        if one:  # every frequency has the same singular values as W itself
            B = w.reshape(g, geom.co, geom.ci).to(torch.complex128)
        H = B @ B.mH if ops.side == "out" else B.mH @ B
        assert torch.allclose(ops.grams(ops.phases(freqs)), H, atol=1e-10)
        X = torch.randn(H.shape[0], 1, ops.c, dtype=torch.complex128)
        rows = ops.apply(ops.phases(freqs))(X)
        # the row action is x -> x H^T on the output side (x^T H^T = (H x)^T) and x -> x H on the input side
        ref = X @ (H.mT if ops.side == "out" else H)
        assert torch.allclose(rows, ref, atol=1e-9), shape


def test_only_frequencies_that_can_hold_the_maximum_are_recomputed():
    torch.manual_seed(2)
    # a kernel with a strong mean: its top values sit at low frequencies, far above the rest
    w = 0.05 * torch.randn(48, 48, 3, 3) + torch.randn(48, 48, 1, 1) / 48**0.5
    n = (16, 16)
    _, state = warm_conv_spectral_norm(w, n)
    w2 = w + 1e-4 * torch.randn_like(w)
    value, state = warm_conv_spectral_norm(w2, n, state=state)
    assert state.recomputed < state.frequencies / 4
    assert float(value) == pytest.approx(_full(w2, n, 1, 1, 1), rel=RTOL)
    # a move that makes a skipped (high) frequency the largest: its bound grows with the move, so it is revisited
    wave = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    w3 = w2 + 3.0 * torch.randn(48, 48, 1, 1) / 48**0.5 * wave
    value, state = warm_conv_spectral_norm(w3, n, state=state)
    assert float(value) == pytest.approx(_full(w3, n, 1, 1, 1), rel=RTOL)


def test_cold_vectors_of_either_route_start_the_warm_runs():
    """The cold run may take the Gram-taps route (rows conjugated there): its vectors must still be
    the ones the warm runs iterate on, so a tiny move converges at the first stagnation test."""
    torch.manual_seed(3)
    w = torch.randn(40, 48, 3, 3)
    n = (8, 8)
    for route in ("taps", "symbol"):
        with spectral_config(gram_route=route):
            _, state = warm_conv_spectral_norm(w, n, rtol=1e-7)
        value, state = warm_conv_spectral_norm(w + 1e-6 * torch.randn_like(w), n, state=state)
        assert state.steps <= 3, route
        assert float(value) == pytest.approx(_full(w, n, 1, 1, 1), rel=RTOL)


def test_state_resets_on_a_new_geometry_and_nan_raises():
    torch.manual_seed(4)
    w = torch.randn(40, 40, 3, 3)
    _, state = warm_conv_spectral_norm(w, (8, 8))
    value, state = warm_conv_spectral_norm(w, (12, 12), state=state)  # another input size: cold
    assert state.recomputed == state.frequencies
    assert float(value) == pytest.approx(_full(w, (12, 12), 1, 1, 1), rel=RTOL)
    bad = w.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        warm_conv_spectral_norm(bad, (12, 12), state=state)


def test_warm_linear_norm():
    torch.manual_seed(5)
    w = torch.randn(120, 70)
    _, state = warm_linear_norm(w)
    for _ in range(3):
        w = w + 0.02 * torch.randn_like(w)
        value, state = warm_linear_norm(w, state=state)
        assert float(value) == pytest.approx(float(linear_spectrum(w.double()).sigma_max), rel=RTOL)


class _OwnNet(pl.LightningModule):
    """A user's own module (not ours): two wide convs and a head, plain SGD with a large step."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 40, 3, padding=1)
        self.c2 = nn.Conv2d(40, 48, 3, padding=1, stride=2)
        self.head = nn.Linear(48 * 4 * 4, 10)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class _Check(pl.Callback):
    """After the monitor's pass: its logged norms against the full spectra of the same weights."""

    def __init__(self, monitor: SpectralMonitor) -> None:
        self.monitor, self.errors, self.warm_passes = monitor, [], 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        sizes = self.monitor.input_sizes
        for name, module in (("c1", pl_module.c1), ("c2", pl_module.c2)):
            ref = float(
                conv_spectrum(module.weight.detach().double(), sizes[name], stride=module.stride).sigma_max
            )
            self.errors.append(abs(self.monitor.last_stats[name]["sigma_max"] - ref) / ref)
        head = self.monitor.last_stats["head"]["sigma_max"]
        ref = float(linear_spectrum(pl_module.head.weight.detach().double()).sigma_max)
        self.errors.append(abs(head - ref) / ref)
        self.warm_passes += int(self.monitor._norm_states["c2"].steps > 0)  # cold runs report 0 steps


def test_monitor_warm_norms_across_a_training_run_in_a_users_module(tmp_path):
    torch.manual_seed(6)
    x, y = torch.randn(96, 3, 8, 8), torch.randint(0, 10, (96,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    monitor = SpectralMonitor(every_n_steps=1, step_stats="norm", full_every_n_epochs=None, plot=False)
    check = _Check(monitor)
    model = _OwnNet()
    w0 = model.c2.weight.detach().clone()
    trainer = pl.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[monitor, check],
    )
    trainer.fit(model, loader)
    assert len(check.errors) == 6 * 3 and max(check.errors) <= RTOL, check.errors
    assert check.warm_passes == 5
    # the weights really moved between passes
    assert float((model.c2.weight.detach() - w0).norm() / w0.norm()) > 0.05
    assert set(monitor._norm_states) == {"c1", "c2", "head"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warm_norms_on_cuda_match_the_cpu_spectrum():
    torch.manual_seed(7)
    for shape, n, s, dil, g in CASES:
        w = torch.randn(*shape)
        value, state = warm_conv_spectral_norm(w.cuda(), n, stride=s, dilation=dil, groups=g)
        w2 = w + 1e-2 * torch.randn_like(w)
        value, state = warm_conv_spectral_norm(w2.cuda(), n, stride=s, dilation=dil, groups=g, state=state)
        assert value.is_cuda and state.weight is not None and state.weight.is_cuda
        assert float(value) == pytest.approx(_full(w2, n, s, dil, g), rel=RTOL), shape
