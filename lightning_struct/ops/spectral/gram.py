"""Gram symbols from the kernel's autocorrelation taps, and the cost model choosing that route.

The Hermitian Gram matrix of the smaller side of the block symbol (``B B^H``, ``C_out`` square, or
``B^H B``, ``S*C_in`` square) is itself the symbol of a convolution (``K K^T`` or ``K^T K``) whose
taps are the autocorrelation of the kernel: one GEMM per offset for half of them,
``O(k^{2d} C^3 / 2)`` in all, after which the
per-frequency Gram costs ``O(F C^2 (2k-1))`` instead of ``O(F C^3)``. The input-side Gram of a
strided convolution is a polyphase matrix, not a coarse convolution: it has no taps route.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lightning_struct.ops.spectral._config import config
from lightning_struct.ops.spectral.geometry import _Geom, _half_indices
from lightning_struct.ops.spectral.symbols import _SymbolBuilder


def _gram_side(geom: _Geom) -> str:
    """``"out"`` (``B B^H``, C_out square) or ``"in"`` (``B^H B``, S*C_in square): the smaller side."""
    return "out" if geom.co <= geom.cols else "in"


def _gram_taps_ok(geom: _Geom, side: str) -> bool:
    # the input-side Gram of a strided conv is a polyphase matrix, not a coarse convolution
    return side == "out" or geom.S == 1


def _tap_classes(geom: _Geom, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Tap offsets ``u`` ``(K, d)`` and the taps grouped by their residue ``u * dil mod s``.

    Only pairs of taps of the same residue class meet on the coarse lattice (contribute to the
    output-side Gram of a strided convolution); with stride 1 there is one class.
    """
    grids = torch.meshgrid(*[torch.arange(k, device=device) for k in geom.k], indexing="ij")
    u = torch.stack([g.reshape(-1) for g in grids], 1)  # (K, d)
    res = torch.remainder(u * torch.tensor(geom.dil, device=device), torch.tensor(geom.s, device=device))
    key = torch.zeros(u.shape[0], dtype=torch.int64, device=device)
    for i in range(geom.d):
        key = key * geom.s[i] + res[:, i]
    classes = [torch.nonzero(key == k).flatten() for k in torch.unique(key)]
    return u, classes


def _gram_taps(wg: torch.Tensor, geom: _Geom, side: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Taps of the Gram convolution on the coarse grid and their positions per dim.

    ``side="out"``: ``K_s K_s^T`` (``C_out x C_out`` taps ``sum_{u-u'=t} W_u W_u'^T`` at fine offsets
    ``t*dil`` divisible by the stride, placed at ``t*dil/s``). ``side="in"`` (stride 1 only):
    ``K^T K`` (``sum_{u'-u=t} W_u^T W_u'``). One GEMM per coarse offset ``t`` over the pairs
    meeting there (their factors stacked along the inner dimension), for half the offsets: the
    tap at ``-t`` is the transpose of the one at ``t``.

    Returns:
        ``(G, c, c, T_1, ..., T_d)`` real taps (Hermitian symbol: ``h_{-t} = h_t^T``) and positions.
    """
    d, G = geom.d, geom.g
    dev = wg.device
    if side == "out":
        c, other = geom.co, geom.ci
        mat = wg.permute(0, *range(3, 3 + d), 1, 2).reshape(G, -1, c, other)  # (G, K, co, ci)
    else:
        c, other = geom.ci, geom.co
        mat = wg.permute(0, *range(3, 3 + d), 2, 1).reshape(G, -1, c, other)  # (G, K, ci, co)
    u, classes = _tap_classes(geom, dev)
    dil = torch.tensor(geom.dil, device=dev)
    s = torch.tensor(geom.s, device=dev)
    # pairs (a, b) of one residue class meet at the coarse offset (u_a - u_b) * dil / s (exact)
    by_offset: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for cls in classes:
        idx = cls.tolist()
        diff = u[cls][:, None, :] - u[cls][None, :, :]
        if side == "in":
            diff = -diff
        coarse = torch.div(diff * dil, s, rounding_mode="floor").tolist()
        for i, a in enumerate(idx):
            for j, b in enumerate(idx):
                by_offset.setdefault(tuple(coarse[i][j]), []).append((a, b))
    positions = [torch.tensor(sorted({key[i] for key in by_offset}), device=dev) for i in range(d)]
    sizes = [len(p) for p in positions]
    where = [{int(v): k for k, v in enumerate(p.tolist())} for p in positions]

    def flat(key: tuple[int, ...]) -> int:
        f = 0
        for i in range(d):
            f = f * sizes[i] + where[i][key[i]]
        return f

    taps = torch.empty(G, math.prod(sizes), c, c, dtype=wg.dtype, device=dev)
    filled = torch.zeros(math.prod(sizes), dtype=torch.bool)
    for key, pairs in by_offset.items():
        neg = tuple(-k for k in key)
        if key < neg:
            continue  # the tap at -t is the transpose of the one at t: formed with it below
        # T_t = sum_{(a, b)} W_a W_b^T: one GEMM over the stacked inner dimensions
        A = mat[:, [a for a, _ in pairs]].permute(0, 2, 1, 3).reshape(G, c, -1)
        B = mat[:, [b for _, b in pairs]].permute(0, 2, 1, 3).reshape(G, c, -1)
        taps[:, flat(key)] = torch.bmm(A, B.transpose(1, 2))
        filled[flat(key)] = True
        if neg != key:
            taps[:, flat(neg)] = taps[:, flat(key)].transpose(1, 2)
            filled[flat(neg)] = True
    if not bool(filled.all()):  # offsets of the product grid no pair reaches
        taps[:, ~filled] = 0
    # one copy into the layout _SymbolBuilder contracts (its last-dim GEMM then reads a view)
    taps = taps.reshape(G, *sizes, c, c).permute(0, d + 1, d + 2, *range(1, d + 1)).contiguous()
    return taps, positions


def _chunk_maker(
    geom: _Geom,
    wg: torch.Tensor,
    pos: Sequence[torch.Tensor],
    cdtype: torch.dtype,
    what: str,
    gram_taps: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    half: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``idx0 -> (F_chunk, G, r, s)`` per-frequency operators for a chunk of dim-0 indices.

    ``what="symbol"``: block symbols ``B``; ``"gram"``: Hermitian Gram symbols of the smaller side,
    from ``gram_taps`` (:func:`_gram_taps`) when given, else ``B B^H`` / ``B^H B`` per frequency.
    """
    idx = _half_indices(geom, wg.device, half)
    if what == "gram" and gram_taps is not None:
        taps, tpos = gram_taps
        return _SymbolBuilder(taps, geom.m, (1,) * geom.d, idx[1:], tpos, cdtype)
    build = _SymbolBuilder(wg, geom.n, geom.s, idx[1:], pos, cdtype, geom.S**-0.5)
    if what == "symbol":
        return build
    if _gram_side(geom) == "out":
        return lambda i: (lambda B: B @ B.mH)(build(i))
    return lambda i: (lambda B: B.mH @ B)(build(i))


def _gram_route_is_cheaper(geom: _Geom, n_freq: int, passes: int | None) -> bool:
    """Cost model (real multiply-adds): the Gram symbol from autocorrelation taps vs the block symbol.

    ``passes=None``: the caller needs the Gram matrices themselves (full eigen-decomposition), so
    the alternative is one complex GEMM ``B B^H`` per frequency. ``passes=p``: the caller applies
    the Gram ``p`` times (Lanczos), either as ``G X`` (one product) or ``B (B^H X)`` (two).
    """
    side = _gram_side(geom)
    if not _gram_taps_ok(geom, side):
        return False
    _, classes = _tap_classes(geom, torch.device("cpu"))
    pairs = sum(len(cls) ** 2 for cls in classes)
    c_small, c_big = (geom.co, geom.cols) if side == "out" else (geom.cols, geom.co)
    c_other = geom.ci if side == "out" else geom.co
    gram_taps = math.prod(2 * k - 1 for k in geom.k)
    fg = n_freq * geom.g
    taps = geom.g * pairs * c_other * c_small * c_small + fg * c_small * c_small * 2 * min(gram_taps, 8)
    sym = fg * geom.co * geom.cols * 2 * min(math.prod(geom.k), 4)
    if passes is None:
        return taps < sym + fg * c_small * c_small * c_big * 4
    # one large GEMM (the taps) runs at about twice the rate of the batched row-vector products
    return 0.5 * taps + passes * fg * c_small * c_small * 4 < sym + passes * fg * geom.co * geom.cols * 8


def _use_gram_taps(geom: _Geom, n_freq: int, passes: int | None) -> bool:
    """Whether to build the Gram symbol from autocorrelation taps: ``config.gram_route``, where
    ``"auto"`` asks :func:`_gram_route_is_cheaper` (arguments as there)."""
    route = config.gram_route
    if route == "symbol":
        return False
    if route == "taps":
        return _gram_taps_ok(geom, _gram_side(geom))
    return _gram_route_is_cheaper(geom, n_freq, passes)
