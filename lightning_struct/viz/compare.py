"""Two networks' spectra side by side: a small-multiples PNG (matplotlib, Agg) and an offline HTML report.

Used by ``lightning-struct spectra --compare A B``: one panel per layer (per run of consecutive
layers sharing a name prefix beyond ``max_panels`` layers), net A in ``tab:blue`` and net B in
``tab:orange``, shared log y axis, x the normalised index ``i / n``. Zero singular values
(``<= ZERO_REL * sigma_max``, e.g. the unused directions of a strided conv) are counted in the
panel corner, not drawn: clamped onto a log axis they would stretch it over many decades.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_struct.viz.spectra import ZERO_REL, _grid, panel_groups, short_name, split_zeros

#: net A, net B
COLOURS: tuple[str, str] = ("tab:blue", "tab:orange")

Spectrum = torch.Tensor | np.ndarray


def _fit_text(fig: Any, text: Any, max_width_px: float, min_size: float = 5.5) -> None:
    """Shrink a figure text's font until it is at most ``max_width_px`` wide."""
    renderer = fig.canvas.get_renderer()
    while text.get_fontsize() > min_size and text.get_window_extent(renderer).width > max_width_px:
        text.set_fontsize(text.get_fontsize() - 0.5)


def _thin(v: np.ndarray, total: int, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """x = i / n of the first ``v.size`` of ``total`` sorted values (the zeros take the rest of the
    axis, undrawn), at most ``max_points`` of them, first and last kept."""
    x = np.arange(v.size, dtype=np.float64) / max(1, total - 1)
    if v.size > max_points:
        idx = np.unique(np.round(np.linspace(0, v.size - 1, max_points)).astype(np.int64))
        return x[idx], v[idx]
    return x, v


def _style(side: int, grouped: bool) -> tuple[Any, float, float]:
    """Line style, width and alpha of net ``side``: B dashed over solid A, so where they coincide both
    stay visible; in stage panels (many lines) B thin over a wide translucent A."""
    if grouped:
        return ("-", 1.6, 0.35) if side == 0 else ("-", 0.6, 0.85)
    return ("-", 1.4, 1.0) if side == 0 else ((0, (4, 1.5)), 1.0, 1.0)


def _ratio_text(lo: float, hi: float) -> str:
    fmt = (lambda r: f"{r:.2f}") if 0.1 <= lo and hi < 100 else (lambda r: f"{r:.2g}")
    return f"σmax B/A {fmt(lo)}" if lo == hi else f"σmax B/A {fmt(lo)}–{fmt(hi)}"


def _panel(
    ax: Any,
    key: str,
    members: Sequence[str],
    sides: tuple[Mapping[str, Spectrum], Mapping[str, Spectrum]],
    labels: tuple[str, str],
    grouped: bool,
    zero_rel: float,
    max_points: int,
) -> None:
    """One panel: each member layer's spectrum of A and of B, its title and corner notes."""
    zeros = [0, 0]
    tops: list[dict[str, float]] = [{}, {}]
    for side, spectra in enumerate(sides):
        ls, lw, alpha = _style(side, grouped)
        for name in members:
            if name not in spectra:
                continue
            v, z = split_zeros(spectra[name], zero_rel)
            zeros[side] += z
            tops[side][name] = float(v[0]) if v.size else 0.0
            if v.size:
                x, y = _thin(v, v.size + z, max_points)
                ax.plot(x, y, color=COLOURS[side], ls=ls, lw=lw, alpha=alpha, marker="." if x.size == 1 else None, ms=4)
    ax.set_yscale("log")
    ax.set_xlim(-0.02, 1.02)
    head = short_name(key, 26 if len(members) == 1 else 20)
    ax.set_title(head + (f".* ({len(members)})" if len(members) > 1 else ""), fontsize=7, pad=2.5)
    ax.tick_params(labelsize=6, length=2, pad=1.5)
    ax.grid(True, which="major", alpha=0.25, lw=0.5)
    notes: list[tuple[str, str]] = []
    ratios = [tops[1][n] / tops[0][n] for n in members if n in tops[0] and n in tops[1] and tops[0][n] > 0]
    if ratios:
        notes.append((_ratio_text(min(ratios), max(ratios)), "0.15"))
    for side in (0, 1):
        only = [n for n in members if n in tops[side] and n not in tops[1 - side]]
        if only:
            notes.append(("only in " + labels[side] if len(only) == len(members) else f"{len(only)} only in {labels[side]}", COLOURS[side]))
    notes += [(f"{zeros[s]} zero{'s' if zeros[s] > 1 else ''}", COLOURS[s]) for s in (0, 1) if zeros[s]]
    for k, (text, colour) in enumerate(notes):
        # bottom left: below a descending spectrum, so no line runs there
        ax.text(0.03, 0.05 + 0.13 * (len(notes) - 1 - k), text, transform=ax.transAxes, ha="left", va="bottom",
                fontsize=6, color=colour, bbox=dict(boxstyle="square,pad=0.08", fc="white", ec="none", alpha=0.75))  # fmt: skip


def plot_compare(
    spectra_a: Mapping[str, Spectrum],
    spectra_b: Mapping[str, Spectrum],
    path: str | Path,
    labels: tuple[str, str] = ("A", "B"),
    order: Sequence[str] | None = None,
    title: str | None = None,
    caption: str | None = None,
    max_panels: int = 64,
    max_points: int = 600,
    zero_rel: float = ZERO_REL,
) -> Path:
    """Small multiples of two nets' sorted singular values, saved as a PNG at ``path``.

    Args:
        spectra_a / spectra_b: layer name -> 1-D singular values (any order; sorted here).
        labels: names of A and B for the legend.
        order: panel order (default: A's layers, then B's extra ones); a layer of only one net
            gets its panel with one line and "only in A/B".
        title / caption: figure title (top) and one-line caption (bottom); sensible defaults.
        max_panels: beyond this many layers, consecutive layers sharing a name prefix share a panel.
        max_points: each line is drawn through at most this many values (first and last kept).
        zero_rel: values ``<= zero_rel * sigma_max`` of their layer count as zeros (not drawn).

    Each single-layer panel notes ``sigma_max`` of B over A; every panel notes its zero counts in
    the series' colours.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    path = Path(path)
    names = list(order) if order is not None else [*spectra_a, *(n for n in spectra_b if n not in spectra_a)]
    sides = (spectra_a, spectra_b)
    names = [n for n in names if any(n in s and np.asarray(s[n]).size for s in sides)]
    groups = panel_groups(names, max_panels)
    n_panels = max(1, len(groups))
    rows, cols = _grid(n_panels)
    grouped = any(len(m) > 1 for _, m in groups)
    panel_w, panel_h = (1.95, 1.5) if not grouped else (2.6, 1.9)
    top_in, bottom_in, left_in, right_in = 0.78, 0.62, 0.5, 0.12
    fig_w = max(6.4, left_in + right_in + cols * panel_w)
    fig_h = top_in + bottom_in + rows * panel_h
    fig, axes = plt.subplots(rows, cols, figsize=(fig_w, fig_h), dpi=110, sharex=True, sharey=True, squeeze=False)
    flat = axes.ravel()
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    for ax, (key, members) in zip(flat, groups):
        _panel(ax, key, members, sides, labels, len(members) > 1, zero_rel, max_points)
    # tick labels on the lowest visible panel of each column, axis labels on the outer ones
    for c in range(cols):
        visible = [r for r in range(rows) if r * cols + c < n_panels]
        if visible:
            ax = axes[visible[-1], c]
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("i / n", fontsize=6.5, labelpad=1)
    for r in range(rows):
        axes[r, 0].set_ylabel("σ", fontsize=7, labelpad=1)
    fig.subplots_adjust(
        left=left_in / fig_w, right=1 - right_in / fig_w, top=1 - top_in / fig_h, bottom=bottom_in / fig_h,
        hspace=0.4, wspace=0.08,
    )  # fmt: skip
    title = title or f"{labels[0]} vs {labels[1]}: sorted singular values per layer"
    t = fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig_h, va="top")
    # stage panels draw both nets solid: then the legend does too (the colour tells them apart)
    handles = [Line2D([], [], color=COLOURS[s], lw=2.0, ls=_style(s, grouped)[0]) for s in (0, 1)]
    fig.legend(handles, [f"A: {labels[0]}", f"B: {labels[1]}"], loc="upper center", ncol=2, fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1 - 0.32 / fig_h), handlelength=2.6, columnspacing=2.5)  # fmt: skip
    caption = caption or (
        f"sorted singular values of each layer's exact operator (periodic boundary): {labels[0]} vs {labels[1]}; "
        f"zeros (<= {zero_rel:g} sigma_max) counted, not drawn"
    )
    cap = fig.text(0.5, 0.1 / fig_h, caption, ha="center", va="bottom", fontsize=7.5, color="0.25")
    width_px = (fig_w - 0.2) * fig.dpi
    _fit_text(fig, t, width_px)
    _fit_text(fig, cap, width_px)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def write_html(
    path: str | Path,
    *,
    title: str,
    command: str,
    sources: Sequence[tuple[str, str]],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    image: str | Path | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """One self-contained HTML page (opens offline): title, the command line, the sources
    (``(label, path)``), ``notes``, the PNG ``image`` embedded as base64 and ``rows`` as a table.

    Ratio columns (names containing ``_over_``) are tinted: blue below 0.9, orange above 1.1.
    """
    path = Path(path)
    columns = list(columns or (rows[0] if rows else []))
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
        "table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:2px 6px}"
        "td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3;position:sticky;top:0}"
        "td.lo{background:#dbe9f6}td.hi{background:#fde3c8}code{background:#f3f3f3;padding:1px 4px}"
        "img{max-width:100%;height:auto;border:1px solid #ddd}</style></head><body>",
        f"<h1 style='font-size:1.3em'>{esc(title)}</h1>",
        f"<p>command: <code>{esc(command)}</code></p>",
        "<ul>" + "".join(f"<li><b>{esc(lab)}</b>: <code>{esc(src)}</code></li>" for lab, src in sources) + "</ul>",
    ]
    parts += [f"<p>{esc(n)}</p>" for n in notes]
    if image is not None:
        data = base64.b64encode(Path(image).read_bytes()).decode("ascii")
        parts.append(f'<p><img alt="{esc(title)}" src="data:image/png;base64,{data}"></p>')
    parts.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr></thead><tbody>")
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cls = "n" if isinstance(v, (int, float)) else ""
            if "_over_" in c and isinstance(v, float) and math.isfinite(v):
                cls += " lo" if v < 0.9 else " hi" if v > 1.1 else ""
            cells.append(f'<td class="{cls.strip()}">{_cell(v)}</td>' if cls else f"<td>{_cell(v)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
