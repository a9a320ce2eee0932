"""The callbacks in one Trainer: a conversion is announced and every callback follows it."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, quiet_trainer, tiny_loader

from lightning_struct import ForceRegularization, SpectralMonitor, StructuredConversion
from lightning_struct.nn import LowRankConv2d
from lightning_struct.ops.spectral import explicit_conv_matrix


class _Trace(SpectralMonitor):
    """Records ``last_stats`` after every pass."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.trace: list[tuple[int, dict[str, dict[str, float]]]] = []

    def _pass(self, trainer, full, epoch_end):
        super()._pass(trainer, full, epoch_end)
        self.trace.append((trainer.global_step, {k: dict(v) for k, v in self.last_stats.items()}))


@pytest.mark.parametrize("step_stats,channels", [("full", (8, 16, 16)), ("norm", (8, 40, 40))])
def test_force_monitor_and_conversion_compose(tmp_path, step_stats, channels):
    """With ``step_stats="norm"`` the warm norms follow the conversion too (40 channels: Lanczos)."""
    torch.manual_seed(0)
    model = TinyCNN(channels=channels)
    force = ForceRegularization(strength=1e-4)
    monitor = _Trace(every_n_steps=1, step_stats=step_stats, full_every_n_epochs=0, plot=False)
    conversion = StructuredConversion("lowrank", at_epoch=1, rank=2, include=["net.2", "net.4"])
    trainer = quiet_trainer(tmp_path, [force, monitor, conversion], max_epochs=2)
    trainer.fit(model, tiny_loader(n=32, size=8))

    converted = {n: m for n, m in model.named_modules() if isinstance(m, LowRankConv2d)}
    assert set(converted) == {"net.2", "net.4"}
    # the monitor holds the live converted modules, not the dead dense ones, and nothing inside them
    assert dict(monitor.layers)["net.2"] is converted["net.2"]
    assert not any(n.startswith("net.2.") for n, _ in monitor.layers)
    # the force holds no dead module
    alive = {id(m) for m in model.modules()}
    assert all(id(layer.module) in alive for layer in force.layers)
    assert "net.2" not in {layer.name for layer in force.layers}

    # values of a converted layer move after the conversion (they were frozen before the fix) ...
    steps = [st["net.2"]["sigma_max"] for step, st in monitor.trace if step > 4]
    assert len(set(steps)) > 1
    # ... and equal the explicit spectrum of the converted operator at the end
    dense = converted["net.2"].to_dense()
    size = monitor.input_sizes["net.2"]
    mat = explicit_conv_matrix(dense.weight.detach().double(), size, stride=dense.stride, dilation=dense.dilation)
    s = torch.linalg.svdvals(mat)
    last = monitor.last_stats["net.2"]
    assert abs(last["sigma_max"] - float(s[0])) <= 1e-4 * float(s[0])
    if step_stats == "norm":  # warm states were kept, and the converted layer's follows its operator
        assert {"net.2", "net.4"} <= set(monitor._norm_states)
        assert torch.equal(monitor._norm_states["net.2"].weight, dense.weight.detach())
