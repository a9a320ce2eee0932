"""Spectra plots (matplotlib, Agg) and W&B payloads for :class:`~lightning_struct.SpectralMonitor`."""

from __future__ import annotations

import math
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


#: a singular value at most this fraction of the layer's sigma_max counts as zero (float32 noise of an
#: exactly rank-deficient 512-channel conv reaches ~1.1e-6 sigma_max)
ZERO_REL = 1e-5


def split_zeros(values: torch.Tensor | np.ndarray, rel: float = ZERO_REL) -> tuple[np.ndarray, int]:
    """A descending spectrum without its (numerical) zeros, and how many there were.

    Zeros (``<= rel * sigma_max``, e.g. the unused directions of a strided or downsampling conv)
    are counted, not drawn: on a log axis a clamped zero stretches the scale over many decades.
    """
    v = np.sort(_np(values).ravel())[::-1]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return v, 0
    keep = v > rel * max(float(v[0]), 0.0)
    return v[keep], int(v.size - keep.sum())


def panel_groups(names: Sequence[str], max_panels: int = 64, min_panels: int = 6) -> list[tuple[str, list[str]]]:
    """One panel per layer for at most ``max_panels`` layers; else one per stage: runs of
    consecutive layers sharing a dotted name prefix, at the shallowest prefix depth that gives at
    least ``min_panels`` panels (torchvision ResNets: ``conv1``, ``layer1`` ... ``layer4``, ``fc``;
    DenseNets: ``features.denseblock1``, ``features.transition1`` ...), else the deepest that fits.

    Returns ``[(panel key, member layer names)]`` in network order; a group's key is its prefix,
    a single layer's key its name.
    """
    names = list(names)
    if len(names) <= max_panels:
        return [(n, [n]) for n in names]
    fitting: list[list[tuple[str, list[str]]]] = []
    for depth in range(1, max(len(n.split(".")) for n in names) + 1):
        groups: list[tuple[str, list[str]]] = []
        for n in names:
            prefix = ".".join(n.split(".")[:depth])
            if groups and groups[-1][0] == prefix:
                groups[-1][1].append(n)
            else:
                groups.append((prefix, [n]))
        if len(groups) > max_panels:
            break
        fitting.append(groups)
        if len(groups) >= min_panels:
            return groups
    return fitting[-1] if fitting else [(n, [n]) for n in names[:max_panels]]


def short_name(name: str, width: int = 24) -> str:
    """``name`` within ``width`` characters: the first dotted part and as many trailing parts as
    fit (``features.…denselayer16.conv2``); the end of the path matters most."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    for keep in range(len(parts) - 2, 0, -1):
        cand = ".".join([parts[0], "…", *parts[-keep:]]).replace(".….", ".…")
        if len(cand) <= width:
            return cand
    return "…" + name[-(width - 1) :]


def _grid(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(max_cols, max(1, math.ceil(math.sqrt(n * 1.6))))
    return math.ceil(n / cols), cols


def _figure(n_panels: int, panel_w: float = 1.9, panel_h: float = 1.45) -> tuple[Any, Any, int]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, cols = _grid(n_panels)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(6.0, cols * panel_w), 1.1 + rows * panel_h), dpi=110, sharex=True, sharey=True,
        squeeze=False,
    )  # fmt: skip
    for ax in axes.ravel()[n_panels:]:
        ax.set_visible(False)
    return fig, axes, cols


def _finish(
    fig: Any, path: Path, title: str, caption: str, legend: tuple[list[Any], list[str]] | None = None, tight: bool = False
) -> Path:
    """Title at the top, caption at the bottom, a figure-level legend outside the panels, margins in inches."""
    import matplotlib.pyplot as plt

    w, h = fig.get_figwidth(), fig.get_figheight()
    fig.suptitle(title, fontsize=10, y=1.0 - 0.08 / h, va="top")
    fig.text(0.5, 0.08 / h, caption, ha="center", va="bottom", fontsize=7.5, color="0.25", wrap=True)
    top = 1.0 - (0.62 if legend is not None else 0.48) / h
    if legend is not None:
        fig.legend(*legend, loc="upper center", fontsize=7.5, frameon=False, ncol=min(8, len(legend[1])),
                   bbox_to_anchor=(0.5, 1.0 - 0.28 / h))  # fmt: skip
    if tight:
        fig.tight_layout(rect=(0.0, 0.42 / h, 1.0, top))
    else:
        fig.subplots_adjust(left=0.55 / w, right=1.0 - 0.12 / w, bottom=0.62 / h, top=top, hspace=0.42, wspace=0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_spectra(
    spectra: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    title: str = "singular values of each layer (periodic boundary)",
    caption: str | None = None,
    max_panels: int = 64,
) -> Path:
    """Small multiples of the sorted singular values, one panel per layer (per stage beyond
    ``max_panels`` layers), shared log axes, saved as a PNG at ``path``.

    x is the normalised index ``i / n`` so layers of different sizes share it. Each panel names its
    ``sigma_max`` and the number of zero singular values, which are counted, not drawn.
    """
    path = Path(path)
    # beyond max_panels layers: the deepest name prefix that still fits
    groups = dict(panel_groups([n for n, v in spectra.items() if _np(v).size], max_panels, min_panels=max_panels + 1))
    fig, axes, _ = _figure(max(1, len(groups)))
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    for ax, (group, members) in zip(axes.ravel(), groups.items()):
        zeros = 0
        top = math.nan
        for k, name in enumerate(members):
            v, z = split_zeros(spectra[name])
            zeros += z
            if v.size == 0:
                continue
            frac = v.size / (v.size + z)  # the zeros take the rest of the axis, undrawn
            v = downsample_sorted(v, 256)
            x = np.linspace(0.0, frac, v.size) if v.size > 1 else np.zeros(1)
            ax.plot(x, v, color=colours(k % 10) if len(members) > 1 else "tab:blue", lw=1.1)
            top = v[0] if math.isnan(top) else max(top, v[0])
        ax.set_yscale("log")
        ax.set_title(short_name(group, 22) + (f" ({len(members)})" if len(members) > 1 else ""), fontsize=7, pad=2)
        ax.tick_params(labelsize=6, length=2)
        ax.grid(True, which="major", alpha=0.25)
        note = f"σmax {top:.3g}" + (f"\n{zeros} zeros" if zeros else "")
        ax.text(0.97, 0.95, note, transform=ax.transAxes, ha="right", va="top", fontsize=6, color="0.2",
                bbox={"facecolor": "white", "alpha": 0.75, "linewidth": 0, "pad": 1.0})  # fmt: skip
    cap = caption or (
        "Sorted singular values of each layer's exact operator (periodic boundary) against i/n, log scale, "
        "shared axes; zero singular values are counted in the corner, not drawn."
    )
    return _finish(fig, path, title, cap)


def plot_spectra_over_time(
    history: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    title: str = "how each layer's spectrum moves",
    max_panels: int = 64,
) -> Path:
    """Small multiples, one panel per layer, of its sorted spectrum at every recorded epoch; the
    colour runs from light (first) to dark (last), so movement reads as a fan of lines."""
    import matplotlib.pyplot as plt

    path = Path(path)
    names = [n for n in history if history[n]][:max_panels]
    fig, axes, _ = _figure(max(1, len(names)))
    cmap = plt.get_cmap("viridis_r")
    labels: list[str] = []
    for ax, name in zip(axes.ravel(), names):
        labels = list(history[name])
        for k, label in enumerate(labels):
            v, _ = split_zeros(history[name][label])
            if v.size == 0:
                continue
            x = np.linspace(0.0, 1.0, v.size) if v.size > 1 else np.zeros(1)
            ax.plot(x, v, color=cmap(0.15 + 0.85 * k / max(1, len(labels) - 1)), lw=1.0)
        ax.set_yscale("log")
        ax.set_title(short_name(name, 22), fontsize=7, pad=2)
        ax.tick_params(labelsize=6, length=2)
        ax.grid(True, which="major", alpha=0.25)
    handles = []
    if labels:
        from matplotlib.lines import Line2D

        picks = sorted({0, len(labels) - 1} | ({len(labels) // 2} if len(labels) > 2 else set()))
        handles = [Line2D([], [], color=cmap(0.15 + 0.85 * k / max(1, len(labels) - 1)), lw=1.5) for k in picks]
        legend = (handles, [labels[k] for k in picks])
    cap = (
        "Sorted singular values (log scale, against i/n) of each layer at each recorded epoch, light = first, "
        "dark = last: a fan shows a spectrum that moves, one line one that does not."
    )
    return _finish(fig, path, title, cap, legend if handles else None)


HEATMAP_STATS: tuple[str, ...] = ("sigma_max", "condition_number", "stable_rank")


def plot_stat_heatmaps(
    stats_history: Mapping[Any, Mapping[str, Mapping[str, float]]],
    path: str | Path,
    stats: Sequence[str] = HEATMAP_STATS,
    title: str = "per-layer statistics over training",
) -> Path:
    """One heatmap per statistic: layers (rows, in network order) by epochs (columns), log10 colour.

    ``stats_history``: ``{epoch: {layer: {stat: value}}}``. NaN cells are shown blank.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = list(stats_history)
    layers: list[str] = []
    for e in epochs:
        layers += [n for n in stats_history[e] if n not in layers]
    rows = max(1, len(layers))
    fig, axes = plt.subplots(
        1, len(stats), figsize=(2.0 + 2.6 * len(stats) + 0.12 * len(epochs), 2.3 + 0.17 * rows), dpi=110,
        sharey=True, squeeze=False,
    )  # fmt: skip
    label_size = 7 if rows <= 30 else 5.5 if rows <= 60 else 4
    for ax, stat in zip(axes[0], stats):
        grid = np.full((rows, max(1, len(epochs))), np.nan)
        for j, e in enumerate(epochs):
            for i, name in enumerate(layers):
                val = stats_history[e].get(name, {}).get(stat, math.nan)
                if val is not None and math.isfinite(val) and val > 0:
                    grid[i, j] = math.log10(val)
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"log10 {stat}", fontsize=8)
        ax.set_xticks(range(len(epochs)))
        ax.set_xticklabels([str(e) for e in epochs], fontsize=6, rotation=90 if len(epochs) > 12 else 0)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers, fontsize=label_size)
        ax.tick_params(length=2)
        cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cb.ax.tick_params(labelsize=6)
    cap = (
        "Each row is a layer (network order), each column an epoch; colour = log10 of the statistic "
        "(sigma_max: operator norm; condition: sigma_max/sigma_min; stable rank: sum sigma^2/sigma_max^2); blank = undefined (a zero sigma)."
    )
    return _finish(fig, path, title, cap, tight=True)


def wandb_histogram(values: torch.Tensor | np.ndarray, bins: int = 64) -> Any:
    """``wandb.Histogram`` of singular values (at most 512 bins, W&B's limit)."""
    import wandb

    v = _np(values).ravel()
    v = v[np.isfinite(v)]
    return wandb.Histogram(np_histogram=np.histogram(v, bins=min(int(bins), 512)))


def wandb_spectrum_lines(history: Mapping[str, np.ndarray], title: str, max_lines: int = 6, points: int = 64) -> Any:
    """A ``wandb.plot.line_series`` of sorted spectra over time: at most ``max_lines`` epochs (the
    first, the last and evenly between) of ``points`` values each, so that a 50-layer network's
    charts stay a small payload (the full curves are in the over-time figure)."""
    import wandb

    keys = list(history)
    if len(keys) > max_lines:
        keys = [keys[int(round(i))] for i in np.linspace(0, len(keys) - 1, max_lines)]
    ys = [list(map(float, downsample_sorted(history[k], points))) for k in keys]
    n = max(len(y) for y in ys)
    xs = [float(i) / max(1, n - 1) for i in range(n)]
    ys = [y + [y[-1]] * (n - len(y)) for y in ys]
    return wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname="i / n")
