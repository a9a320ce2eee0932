"""Shared benchmark machinery: median timing, result rows, table and JSON output.

Every benchmark compares "ours" against a baseline *measured in the same process*; the
reported figure is ``ratio = baseline_s / ours_s`` (> 1 means ours is faster), absolute
times are context only.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Row:
    """One comparison: ``ours`` against one ``baseline`` on one ``case``."""

    case: str
    ours_s: float
    baseline: str
    baseline_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.baseline_s / self.ours_s if self.ours_s > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        if not d["extra"]:
            d.pop("extra")
        return d


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], Any],
    *,
    repeats: int = 7,
    warmup: int = 1,
    min_time: float = 0.0,
    device: torch.device | str | None = None,
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs.

    ``min_time`` keeps repeating (beyond ``repeats``) until that much time was spent, which
    stabilises very short measurements. CUDA work is synchronised around each run.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or spent < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if len(times) > 1000:
            break
    return statistics.median(times)


def format_table(rows: Sequence[Row], title: str) -> str:
    """Plain-text table (also used by tests and README): case, ours, baseline, ratio."""
    header = f"{'case':<44} {'ours_s':>10} {'baseline':<22} {'baseline_s':>11} {'ratio':>8}"
    lines = [title, header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.case:<44} {r.ours_s:>10.5f} {r.baseline:<22} {r.baseline_s:>11.5f} {r.ratio:>7.2f}x"
        )
    return "\n".join(lines)


def emit(rows: Sequence[Row], title: str, json_path: str | Path | None) -> None:
    """Print the table and optionally write the rows as JSON (list of dicts)."""
    print(format_table(rows, title), flush=True)
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
        print(f"wrote {path}")


def environment() -> str:
    """One line naming the machine the numbers were taken on."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}"
