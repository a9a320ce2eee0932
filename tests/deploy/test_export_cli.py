"""`lightning-struct export` on the checkpoint a recipe wrote: the artifact reproduces the test accuracy."""

from __future__ import annotations

import re

import pytest
from helpers import run_cli

from lightning_struct.deploy.runtime import has_onnx


@pytest.mark.slow
@pytest.mark.skipif(not has_onnx(), reason="the export extra is not installed")
def test_cli_export_of_digits_lowrank_reproduces_test_accuracy_in_onnxruntime(tmp_path):
    train = run_cli(["train", "recipe=wen2017/digits_lowrank"], cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    text = train.stdout + train.stderr
    best = re.search(r"best checkpoint : (\S+)", text).group(1)
    test_acc = float(re.search(r"test/acc=([0-9.]+)", text).group(1))
    assert "finetune" in best  # the converted (low-rank) network, after fine-tuning
    out = run_cli(["export", f"ckpt={best}", "evaluate=test"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"test accuracy on (\d+) samples: eager ([0-9.]+), onnx ([0-9.]+)", out.stdout)
    assert m, out.stdout
    n, eager, onnx = int(m.group(1)), float(m.group(2)), float(m.group(3))
    assert abs(eager - test_acc) < 1e-3  # what `train` reported for its best checkpoint
    assert abs(onnx - eager) <= 1.0 / n  # at most one sample flips at a decision boundary


def test_cli_export_errors_are_clear(tmp_path):
    out = run_cli(["export", "ckpt=nope.ckpt"], cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run_cli(["export", "ckpt=x", "fromat=onnx"], cwd=tmp_path)
    assert out.returncode == 2 and "format" in out.stderr
    out = run_cli(["export", "ckpt=x", "format=tflite"], cwd=tmp_path)
    assert out.returncode == 2 and "allowed" in out.stderr
