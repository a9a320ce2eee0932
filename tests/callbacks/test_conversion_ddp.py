"""StructuredConversion inside one fit under DDP (2 processes, gloo, CPU, ``strategy="ddp"``).

Each case runs ``ddp_convert_script.py`` in a subprocess (Lightning's launcher starts rank 1 by
re-running it, as in Lightning's own DDP tests): force + monitor + conversion at epoch 1 of 3 in
the user's own LightningModule. After the run both ranks hold bit-identical state dicts (hashes),
the converted layer types on both, the fresh DDP wrapper holds every parameter, and ``last.ckpt``
reloads in this (single) process with ``load_converted`` to the same outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ddp_convert_script.py"

pytestmark = pytest.mark.slow


def _run(out: Path, method: str, mode: str, precision: str = "32-true") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), method, mode, precision], env=env, capture_output=True, text=True, timeout=420
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _fresh_outputs(ckpt: Path) -> torch.Tensor:
    sys.path.insert(0, str(HERE))
    try:
        from ddp_convert_script import UserNet
    finally:
        sys.path.remove(str(HERE))
    from lightning_struct import load_converted

    model = load_converted(str(ckpt), UserNet()).eval()
    with torch.no_grad():
        return model(torch.ones(2, 1, 8, 8))


@pytest.fixture(scope="module")
def lowrank_full(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp") / "full"
    return out, _run(out, "lowrank", "full")


def test_lowrank_in_fit_under_ddp_ranks_identical_and_reloadable(lowrank_full):
    out, ranks = lowrank_full
    assert ranks[0]["hash"] == ranks[1]["hash"], "ranks drifted apart"
    for r in ranks:
        assert r["converted"] and r["types"]["hidden"] == "LowRankLinear" and r["types"]["body.2"] == "LowRankConv2d"
        assert r["types"]["stem"] == "Conv2d" and r["types"]["head"] == "Linear", "stem and classifier stay dense"
        assert r["ddp_params"] == r["params"], "the DDP wrapper is the fresh one around the converted module"
    assert ranks[0]["monitored"]["hidden"] == "LowRankLinear", "the monitor follows the conversion on rank 0"
    # same weights; this process may run the convs with another thread count (float rounding)
    torch.testing.assert_close(_fresh_outputs(out / "checkpoints" / "last.ckpt"), torch.load(out / "out.pt"), rtol=1e-5, atol=1e-6)


def test_acdc_in_fit_under_ddp(tmp_path):
    ranks = _run(tmp_path / "acdc", "acdc", "full")
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert all(r["types"]["wide"] == "ACDCStack" for r in ranks)
    torch.testing.assert_close(
        _fresh_outputs(tmp_path / "acdc" / "checkpoints" / "last.ckpt"), torch.load(tmp_path / "acdc" / "out.pt"), rtol=1e-5, atol=1e-6
    )


def test_resume_after_the_conversion_under_ddp_equals_the_uninterrupted_run(lowrank_full, tmp_path):
    _, full = lowrank_full
    stopped = _run(tmp_path / "stop", "lowrank", "stop")
    assert stopped[0]["converted"] and stopped[0]["epoch"] == 2
    resumed = _run(tmp_path / "resume", "lowrank", "resume")
    assert resumed[0]["hash"] == resumed[1]["hash"] == full[0]["hash"], "same weights as the run never stopped"


def test_resume_before_the_conversion_converts_at_its_epoch(lowrank_full, tmp_path):
    _, full = lowrank_full
    stopped = _run(tmp_path / "stop0", "lowrank", "stop0")
    assert not stopped[0]["converted"] and stopped[0]["types"]["hidden"] == "Linear"
    resumed = _run(tmp_path / "resume0", "lowrank", "resume0")
    assert resumed[0]["converted"] and resumed[0]["hash"] == resumed[1]["hash"] == full[0]["hash"]


def test_two_phase_function_under_the_ddp_launcher(tmp_path):
    ranks = _run(tmp_path / "two", "lowrank", "two_phase")
    assert ranks[0]["hash"] == ranks[1]["hash"] and ranks[0]["types"]["hidden"] == "LowRankLinear"


def test_bf16_mixed_under_ddp_converts_and_trains(tmp_path):
    ranks = _run(tmp_path / "bf16", "lowrank", "full", "bf16-mixed")
    assert ranks[0]["hash"] == ranks[1]["hash"] and ranks[0]["types"]["hidden"] == "LowRankLinear"


def test_strategies_that_cannot_be_rewrapped_are_refused_at_fit_start():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from torch import nn

    from lightning_struct import StructuredConversion

    model = pl.LightningModule()
    model.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    cb = StructuredConversion("lowrank", at_epoch=1, rank=2)
    fsdp = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy .*sharded.*fit_convert_finetune"):
        cb.setup(fsdp, model, "fit")  # type: ignore[arg-type]
    spawn = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False, max_epochs=3)
    with pytest.raises(MisconfigurationException, match=r"'spawn'.*non-strict.*fit_convert_finetune"):
        cb.setup(spawn, model, "fit")
    ddp = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, max_epochs=3)
    cb.setup(ddp, model, "fit")  # accepted
