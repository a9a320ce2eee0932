"""The one-command Wen et al. pipeline on digits, end to end: trained start -> force -> low-rank -> fine-tune -> test -> ONNX."""

from __future__ import annotations

import csv
import re

import pytest
from helpers import run_cli

from lightning_struct.deploy.runtime import has_onnx


def _column(path, key):
    with open(path) as fh:
        return [float(r[key]) for r in csv.DictReader(fh) if r.get(key)]


@pytest.mark.slow
@pytest.mark.skipif(not has_onnx(), reason="the export extra is not installed")
def test_digits_pipeline_from_a_trained_checkpoint(tmp_path):
    qs = run_cli(["train", "recipe=quickstart", "logger=csv"], cwd=tmp_path)
    assert qs.returncode == 0, qs.stderr[-3000:]
    start = next(tmp_path.glob("logs/quickstart/runs/*/checkpoints/last.ckpt"))
    out = run_cli(["train", "recipe=wen2017/digits_pipeline", f"init_ckpt={start}", "logger=csv"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"^init: 24 tensors loaded into the model", text, re.M), text[-2000:]
    run = next(tmp_path.glob("logs/wen2017_digits_pipeline/runs/*"))
    metrics = run / "metrics.csv"
    # (1) the force lowered the rank of the trained net
    frac = _column(metrics, "force/total_rank_fraction@0.95")
    assert frac[0] > 0.7 and frac[-1] < 0.5, frac
    # (2) the conversion took the low-rank structure: fewer than 60% of the parameters remain
    before, after = _column(metrics, "conversion/params_before")[0], _column(metrics, "conversion/params_after")[0]
    assert after < 0.6 * before, (before, after)
    # (3) the fine-tuned low-rank net keeps the accuracy, (4) tested, (5) exported: same accuracy in onnxruntime
    test_acc = float(re.search(r"test/acc=([0-9.]+)", text).group(1))
    assert test_acc >= 0.97
    m = re.search(r"exported +: (\S+) .*test accuracy in onnxruntime: ([0-9.]+) on (\d+) samples", text)
    assert m, text[-2000:]
    assert m.group(1).endswith("export/model.onnx") and (run / "export" / "model.onnx").is_file()
    assert abs(float(m.group(2)) - test_acc) <= 1.0 / int(m.group(3)) + 1e-4
    # every phase keeps its checkpoints
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "finetune" / "last.ckpt").is_file()
