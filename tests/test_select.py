"""Layer selection shared by every callback: typos in include/exclude are errors."""

from __future__ import annotations

import pytest
from helpers import TinyCNN, quiet_trainer, tiny_loader
from torch import nn

from lightning_struct import FFTConvolution, ForceRegularization, SpectralMonitor, StructuredConversion
from lightning_struct.select import select_layers


def test_exclude_matching_nothing_is_an_error_naming_the_layers():
    model = TinyCNN(channels=(4, 8))
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) \['net\.22'\] match no layer.*net\.0"):
        select_layers(model, (nn.Conv2d,), exclude=["net.22"], what="test")
    assert [n for n, _ in select_layers(model, (nn.Conv2d,), exclude=["net.2"])] == ["net.0"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ForceRegularization(strength=1e-4, exclude="net.99"),
        lambda: SpectralMonitor(every_n_steps=1, exclude="net.99", plot=False),
        lambda: StructuredConversion("lowrank", at_epoch=1, rank=1, exclude="net.99"),
        lambda: FFTConvolution(policy="always", exclude="net.99"),
    ],
    ids=["force", "monitor", "conversion", "fftconv"],
)
def test_every_callback_refuses_an_exclude_typo_before_training(make, tmp_path):
    trainer = quiet_trainer(tmp_path, [make()], max_epochs=2)
    with pytest.raises(ValueError, match="exclude pattern"):
        trainer.fit(TinyCNN(channels=(4, 8)), tiny_loader(n=16))
