"""Test-wide settings: W&B offline and silent, Hydra full errors, few threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")

# make `import helpers` work from any test sub-directory
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path, monkeypatch):
    """Every test writes W&B files into its own temp dir, never into the repo."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield
