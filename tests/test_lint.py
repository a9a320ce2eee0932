"""The package and the tests stay ruff-clean (rules in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_ruff_check_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "lightning_struct", "tests"], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
