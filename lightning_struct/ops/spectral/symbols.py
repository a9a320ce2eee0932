"""Block symbols ``B(Theta)`` of a convolution on the coarse frequency grid, and Fourier modes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_struct.ops.spectral._pool import cpu_single_threaded
from lightning_struct.ops.spectral.geometry import (
    _complex,
    _compute_dtype,
    _Geom,
    _geometry,
    _half_indices,
    _multiplicity,
    _tuple,
)

__all__ = ["conv_symbol", "frequency_mode"]


def _phases(
    n: int, m: int, s: int, idx: torch.Tensor, positions: torch.Tensor, cdtype: torch.dtype
) -> torch.Tensor:
    """``exp(2 pi i (J + a m) p / n)`` of shape ``(len(idx), s, len(positions))``.

    ``idx`` are coarse frequency indices, ``a`` the alias index, ``p`` integer tap positions
    (any sign). The product is reduced modulo ``n`` in int64 before the float conversion so the
    phases are exact to rounding even for large ``n``.
    """
    fine = idx[:, None] + m * torch.arange(s, device=idx.device)[None, :]  # (M, s)
    prod = torch.remainder(fine[..., None] * positions[None, None, :], n)  # (M, s, k), in [0, n)
    real = torch.float64 if cdtype == torch.complex128 else torch.float32
    angle = prod.to(torch.float64) * (2.0 * math.pi / n)
    return torch.polar(torch.ones((), dtype=real, device=idx.device), angle.to(real))


class _SymbolBuilder:
    """Block symbols of real taps on a product grid of coarse frequencies, chunked along dim 0.

    The contraction over the taps of dims ``1..d-1`` does not depend on the chunk and is done once
    (real GEMMs with the cosine and sine tables for the last dim); each chunk is then one complex
    GEMM with the phases of dim 0 that lands directly in the output layout.

    Args:
        wg: real taps ``(G, R, C, t_1, ..., t_d)``.
        n: fine grid size per dim; ``s``: stride per dim (coarse grid ``n/s``).
        idx_rest: coarse frequency indices of dims ``1..d-1`` (int64 tensors).
        positions: integer tap positions per dim (``len = t_i``).
        scale: multiplies the symbol (``S^{-1/2}`` for block symbols).
    """

    def __init__(
        self,
        wg: torch.Tensor,
        n: Sequence[int],
        s: Sequence[int],
        idx_rest: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
        cdtype: torch.dtype,
        scale: float = 1.0,
    ) -> None:
        d = len(n)
        self.n, self.s, self.positions, self.cdtype, self.d = tuple(n), tuple(s), list(positions), cdtype, d
        G, R, C = wg.shape[:3]
        self.G, self.R, self.C = G, R, C
        self.rest_sizes = [len(t) for t in idx_rest]
        x = wg * scale if scale != 1.0 else wg  # (G, R, C, t_1..t_d), real
        if d == 1:
            y = x.permute(3, 0, 1, 2).to(cdtype)  # (t_1, G, R, C)
        else:
            # last dim: real GEMMs with cos / sin tables -> (G, R, C, t_1..t_{d-1}, M_d s_d)
            E = _phases(n[-1], n[-1] // s[-1], s[-1], idx_rest[-1], positions[-1], cdtype)
            E = E.reshape(-1, E.shape[-1])  # (M_d s_d, t_d)
            # one 2-D GEMM (a broadcast matmul would run one tiny GEMM per leading index)
            x2 = x.reshape(-1, x.shape[-1])
            ER = torch.cat([E.real, E.imag]).T.to(x.dtype)  # (t_d, 2 M_d s_d)
            y2 = (x2 @ ER).reshape(*x.shape[:-1], 2, -1)
            y = torch.complex(y2[..., 0, :], y2[..., 1, :])
            # middle dims (3-D convs): complex contractions, appending (M_i s_i) axes
            for i in range(d - 2, 0, -1):
                Ei = _phases(n[i], n[i] // s[i], s[i], idx_rest[i - 1], positions[i], cdtype)
                y = torch.tensordot(y, Ei.reshape(-1, Ei.shape[-1]), dims=([3 + i], [1]))
            # y: (G, R, C, t_1, M_d s_d, M_{d-1} s_{d-1}, ..., M_2 s_2)
            shape = [G, R, C, y.shape[3]]
            for i in range(d - 1, 0, -1):
                shape += [self.rest_sizes[i - 1], s[i]]
            y = y.reshape(shape)
            # axes of (M_i, s_i) for i = d-1 .. 1 start at 4
            m_ax = {i: 4 + 2 * (d - 1 - i) for i in range(1, d)}
            order = [3] + [m_ax[i] for i in range(1, d)] + [0, 1] + [m_ax[i] + 1 for i in range(1, d)] + [2]
            y = y.permute(order)  # (t_1, M_2..M_d, G, R, s_2..s_d, C)
        self.y = y.reshape(y.shape[0], -1).contiguous()  # (t_1, rest)

    def numel(self, rows: int) -> int:
        """Complex entries of the symbols of ``rows`` dim-0 indices."""
        return rows * self.s[0] * self.y.shape[1]

    def __call__(self, idx0: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """``(F_chunk, G, R, S*C)`` symbols at coarse indices ``idx0 x idx_rest`` (row-major).

        ``buffer``: a flat tensor of at least :meth:`numel` entries to write into (re-using one
        buffer avoids the page faults of a fresh large allocation per chunk).
        """
        E0 = _phases(self.n[0], self.n[0] // self.s[0], self.s[0], idx0, self.positions[0], self.cdtype)
        M0, s0 = E0.shape[0], self.s[0]
        if buffer is None:
            out = E0.reshape(M0 * s0, -1) @ self.y  # (M0 s0, rest)
        else:
            out = buffer[: self.numel(M0)].view(M0 * s0, -1)
            torch.matmul(E0.reshape(M0 * s0, -1), self.y, out=out)
        rest = math.prod(self.rest_sizes)
        S_rest = math.prod(self.s[1:])
        out = out.reshape(M0, s0, rest, self.G, self.R, S_rest * self.C)
        if s0 > 1:
            out = out.permute(0, 2, 3, 4, 1, 5)
        return out.reshape(M0 * rest, self.G, self.R, s0 * S_rest * self.C)


def _symbol_chunk(
    wg: torch.Tensor,
    n: Sequence[int],
    s: Sequence[int],
    idx: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    cdtype: torch.dtype,
) -> torch.Tensor:
    """Block symbol (not scaled by ``S^{-1/2}``) at the product grid ``idx[0] x ... x idx[d-1]``:
    ``(F, G, R, S*C)``, frequencies row-major, columns ordered ``(a_1, ..., a_d, c)``."""
    return _SymbolBuilder(wg, n, s, idx[1:], positions, cdtype)(idx[0])


def _kernel_taps(
    weight: torch.Tensor, geom: _Geom, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(G, C_out/G, C_in/G, *k)`` taps and their dilated positions per dim."""
    wg = weight.detach().to(dtype).reshape(geom.g, geom.co, geom.ci, *geom.k)
    pos = [torch.arange(geom.k[i], device=weight.device) * geom.dil[i] for i in range(geom.d)]
    return wg, pos
@cpu_single_threaded
def conv_symbol(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    half: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block symbols ``B(Theta)`` of a convolution on the coarse frequency grid.

    Args:
        weight: ``(C_out, C_in/groups, *kernel)`` real, 1-3 spatial dims.
        input_size: spatial input size ``(n_1, ..., n_d)`` (an int for all dims).
        stride, dilation, groups: as in ``nn.Conv*d``.
        half: only the ``rfft`` half grid (last coarse index ``0..m_d//2``).
        dtype: ``torch.float32`` (default; complex64 symbols) or ``torch.float64``.

    Returns:
        ``(symbol, multiplicity)``: ``symbol`` of shape ``(F, groups, C_out/groups, S*C_in/groups)``
        (complex; frequencies row-major over the coarse grid ``n/stride``, halved in the last dim
        when ``half``), and ``multiplicity`` ``(F,)`` int64 (all ones when ``half=False``).
    """
    geom = _geometry(weight, input_size, stride, dilation, groups)
    rdt = _compute_dtype(weight, dtype)
    wg, pos = _kernel_taps(weight, geom, rdt)
    idx = _half_indices(geom, weight.device, half)
    sym = _SymbolBuilder(wg, geom.n, geom.s, idx[1:], pos, _complex(rdt), geom.S**-0.5)(idx[0])
    mult = (
        _multiplicity(geom, weight.device)
        if half
        else torch.ones(sym.shape[0], dtype=torch.int64, device=weight.device)
    )
    return sym, mult


def frequency_mode(
    vector: torch.Tensor, input_size: Sequence[int], freq: Sequence[int], stride: Sequence[int] | int = 1
) -> torch.Tensor:
    """The spatial pattern of a per-frequency singular vector (for checks and visualisation).

    Args:
        vector: ``(S*C,)`` complex coefficients (a column of ``vh[f, g].conj().T``, or of ``u``
            with ``stride=1`` and the coarse grid as ``input_size``).
        input_size: fine grid ``n``; ``freq``: coarse frequency index ``J`` (length d).
        stride: the stride (the ``S`` alias blocks of ``vector`` are ordered ``(a_1, ..., a_d)``).

    Returns:
        ``(C, *n)`` complex unit-norm pattern ``sum_a vector[a] exp(i theta_a . p) / sqrt(N)``.
    """
    n = tuple(input_size)
    d = len(n)
    s = _tuple(stride, d, "stride", 1)
    S = math.prod(s)
    C = vector.shape[0] // S
    coef = vector.reshape(*s, C)
    out = torch.zeros(C, *n, dtype=vector.dtype, device=vector.device)
    grids = torch.meshgrid(*[torch.arange(ni, device=vector.device) for ni in n], indexing="ij")
    for a in torch.cartesian_prod(*[torch.arange(si) for si in s]).reshape(S, d).tolist():
        phase = torch.zeros(n, dtype=torch.float64, device=vector.device)
        for i in range(d):
            fine = freq[i] + a[i] * (n[i] // s[i])
            phase = phase + 2 * math.pi * torch.remainder(fine * grids[i], n[i]).double() / n[i]
        wave = torch.polar(torch.ones_like(phase), phase).to(vector.dtype)
        out = out + coef[tuple(a)].reshape(C, *([1] * d)) * wave[None]
    return out / math.sqrt(math.prod(n))
