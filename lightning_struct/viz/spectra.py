"""Spectra plots (matplotlib, Agg) and W&B payloads for :class:`~lightning_struct.SpectralMonitor`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _np(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def downsample_sorted(values: torch.Tensor | np.ndarray, points: int = 256) -> np.ndarray:
    """A descending spectrum resampled to at most ``points`` values at evenly spaced quantiles.

    Keeps the first (``sigma_max``) and last (``sigma_min``) values exactly; used for line charts
    and histories, where millions of values per layer would be useless and heavy.
    """
    v = np.sort(_np(values).ravel())[::-1]
    if v.size <= points:
        return v
    idx = np.round(np.linspace(0, v.size - 1, points)).astype(np.int64)
    return v[idx]


def plot_spectra(
    spectra: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    title: str = "singular values of each layer (periodic boundary)",
) -> Path:
    """Save one figure of every layer's sorted singular values (log scale) to ``path`` (PNG).

    The x axis is the normalised index ``i / count`` so layers of different sizes share it; the
    legend gives each layer's ``sigma_max``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    cmap = plt.get_cmap("viridis", max(2, len(spectra)))
    for i, (name, values) in enumerate(spectra.items()):
        v = downsample_sorted(values, 512)
        if v.size == 0 or not np.all(np.isfinite(v)):
            continue
        x = np.linspace(0.0, 1.0, v.size)
        ax.plot(x, np.maximum(v, 1e-12), color=cmap(i), lw=1.4, label=f"{name}  (σmax {v[0]:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel("normalised index i / n (descending)")
    ax.set_ylabel("singular value σ")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=1 if len(spectra) <= 12 else 2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def wandb_histogram(values: torch.Tensor | np.ndarray, bins: int = 64) -> Any:
    """``wandb.Histogram`` of singular values (at most 512 bins, W&B's limit)."""
    import wandb

    v = _np(values).ravel()
    v = v[np.isfinite(v)]
    return wandb.Histogram(np_histogram=np.histogram(v, bins=min(int(bins), 512)))


def wandb_spectrum_lines(history: Mapping[str, np.ndarray], title: str) -> Any:
    """A ``wandb.plot.line_series`` of sorted spectra over time (one line per epoch/step key)."""
    import wandb

    keys = list(history)
    ys = [list(map(float, history[k])) for k in keys]
    n = max(len(y) for y in ys)
    xs = [float(i) / max(1, n - 1) for i in range(n)]
    ys = [y + [y[-1]] * (n - len(y)) for y in ys]
    return wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname="i / n")
