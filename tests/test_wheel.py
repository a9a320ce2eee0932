"""The wheel ships conf/ and recipes/: install it into a fresh venv and run a recipe elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import REPO


@pytest.mark.slow
def test_wheel_contains_configs_and_runs_a_recipe_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("lightning_struct-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_struct/conf/config.yaml" in names
    assert "lightning_struct/recipes/quickstart.yaml" in names
    assert "lightning_struct/py.typed" in names

    # a fresh venv that sees the heavy dependencies (torch, lightning ...) of the test environment
    # through a .pth file, but gets lightning-struct itself only from the wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]
    Path(site, "_deps.pth").write_text(deps + "\n")
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": ""}
    exe = venv / "bin" / "lightning-struct"
    info = subprocess.run([str(exe), "train", "--info", "searchpath"], cwd=outside, capture_output=True, text=True, env=env)
    assert info.returncode == 0, info.stderr[-2000:]
    assert str(REPO / "conf") not in info.stdout, "the installed command must use the configs inside the wheel"
    assert "site-packages/lightning_struct/conf" in info.stdout
    run = subprocess.run(
        [
            str(exe), "train", "recipe=quickstart", "trainer.max_epochs=1", "logger=csv", "test=false",
            "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "hydra.run.dir=run",
        ],
        cwd=outside, capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (outside / "run" / "metrics.csv").is_file()
    assert "lightning-struct train finished" in run.stdout
