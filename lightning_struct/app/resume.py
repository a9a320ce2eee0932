"""Resume a ``lightning-struct train`` run into the run it came from.

``ckpt_path=<run>/checkpoints/last.ckpt`` makes the resumed job write into ``<run>`` itself (the
``hydra.run.dir`` default goes through the ``ls_run_dir`` resolver), so the checkpoint directory,
``metrics.csv`` and the best-checkpoint score carry on, and the W&B logger reattaches to the run id
found under ``<run>/wandb``. An explicit ``hydra.run.dir=...`` still wins.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["register_resolvers", "resume_command", "run_dir_of_checkpoint", "wandb_run_id"]

_WANDB_RUN = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>[a-z0-9]+)$")


def run_dir_of_checkpoint(ckpt_path: Any) -> Path | None:
    """``<run>`` for a file ``<run>/checkpoints/*.ckpt`` of a Hydra run (``<run>/.hydra`` exists), else ``None``."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file() or path.parent.name != "checkpoints":
        return None
    run = path.parent.parent
    return run if (run / ".hydra").is_dir() else None


def _run_dir(ckpt_path: Any, default: Any) -> str:
    run = run_dir_of_checkpoint(ckpt_path)
    return str(run) if run is not None else str(default)


def register_resolvers() -> None:
    """``${ls_run_dir:${ckpt_path},<default>}``: the run of a resumed checkpoint, else ``<default>``."""
    if not OmegaConf.has_resolver("ls_run_dir"):
        OmegaConf.register_new_resolver("ls_run_dir", _run_dir)


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run written under ``run_dir/wandb`` (online or offline), if any."""
    runs = []
    for d in (run_dir / "wandb").glob("*run-*"):
        m = _WANDB_RUN.match(d.name)
        if m and d.is_dir():
            runs.append((d.name.split("-")[-2], m.group("id")))  # (timestamp, id)
    return max(runs)[1] if runs else None


def resume_command(overrides: Sequence[str], checkpoint: str) -> str:
    """The ``lightning-struct train`` line that resumes from ``checkpoint`` with the same overrides."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    return shlex.join(["lightning-struct", "train", *kept, f"ckpt_path={checkpoint}"])
