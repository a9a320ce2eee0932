"""Operator norms that stay warm between calls: the monitor's every-N-steps path.

Between two monitor calls the weights move a little, and so does every frequency's Gram operator.
:func:`warm_conv_spectral_norm` keeps, per layer (a :class:`NormState`), the top Ritz vector of
every frequency's (and group's) Gram operator and a lower and an upper estimate of its top
singular value. At the next call it

1. bounds how far each frequency's top singular value can have moved. By Weyl's inequality
   ``|sigma_1(B'(theta)) - sigma_1(B(theta))| <= ||B' - B||_2 <= delta(theta) = ||B' - B||_F``,
   and the symbol being a phase-weighted sum of the taps, ``delta(theta)^2`` is a quadratic form
   of the phases in the ``K x K`` Gram of the taps' change (one pass over the change);
2. recomputes only the frequencies whose upper estimate plus ``delta`` still reaches the largest
   lower bound minus ``delta`` (a lower bound of the new norm: Ritz values approach from below);
   every other frequency provably cannot hold the maximum, and its estimates widen by ``delta``;
3. runs those from their last Ritz vectors, stopping once the largest Ritz value grew by less
   than ``rtol / 4`` in one step (often after 2 steps), on the operators applied without
   forming a symbol (:class:`_Operators`: two GEMMs with the kernel per step).

The first call (or one after the geometry changed) is :func:`conv_spectral_norm`'s cold run,
which also hands over its Ritz vectors. The state holds one copy of the weight (in the compute
dtype) and ``F * groups * c`` complex vector entries (``F`` half-grid frequencies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lightning_struct._checks import check_number
from lightning_struct.ops.spectral._config import config
from lightning_struct.ops.spectral._pool import all_threads, cpu_single_threaded, parallel_map, workers
from lightning_struct.ops.spectral.eigen import _eigvalsh_desc
from lightning_struct.ops.spectral.geometry import _check_weight, _complex, _compute_dtype, _Geom, _geometry
from lightning_struct.ops.spectral.norm import _lanczos, _lanczos_norm, _ritz
from lightning_struct.ops.spectral.symbols import _phases

__all__ = ["NormState", "warm_conv_spectral_norm", "warm_linear_norm"]

#: relative allowance on a top Ritz value as an estimate of the top singular value it approaches
#: from below: a cold run stops on the largest one of a chunk, so the others may lag (3e-4 seen
#: on random kernels); warm runs start next to the answer
_COLD_MARGIN = 1e-2
_WARM_MARGIN = 1e-3
_EXACT_MARGIN = 1e-5  # exact eigenvalues, to rounding
#: warm runs test stagnation one step apart (from the Rayleigh quotient on), with a tighter tolerance
_WARM_RTOL = 0.25


@dataclass
class NormState:
    """What :func:`warm_conv_spectral_norm` carries from one call to the next (one layer).

    Attributes:
        key: the geometry and dtype the state belongs to (another key: a cold run).
        weight: the weight of the last call, in the compute dtype (``None``: no call yet).
        vectors: ``(F, groups, c)`` unit top Ritz vectors per half-grid frequency and group.
        upper: ``(F, groups)`` float64 upper estimates of the top singular values.
        lower: ``(F, groups)`` float64 lower bounds of them (Ritz values, less the moves since).
        recomputed: frequencies recomputed at the last call; ``frequencies``: all of them.
        steps: Lanczos steps of the last call (the most over its chunks).
    """

    key: tuple
    weight: torch.Tensor | None = None
    vectors: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    lower: torch.Tensor | None = None
    recomputed: int = 0
    frequencies: int = 0
    steps: int = 0

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.weight, self.vectors, self.upper, self.lower)
            if t is not None
        )


def _half_frequencies(geom: _Geom, device: torch.device) -> torch.Tensor:
    """``(F, d)`` coarse half-grid frequency indices, row-major (the order of :func:`conv_symbol`)."""
    axes = [torch.arange(M, device=device) for M in geom.grid(True)]
    return torch.cartesian_prod(*axes).reshape(-1, geom.d)


def _phase_rows(
    freqs: torch.Tensor,
    n: Sequence[int],
    s: Sequence[int],
    positions: Sequence[torch.Tensor],
    cdtype: torch.dtype,
) -> torch.Tensor:
    """``(F*S, T)`` phases ``exp(2 pi i sum_i (J_i + a_i n_i/s_i) p_i / n_i)`` of every alias ``a`` and tap ``p``.

    The product over dims of :func:`~lightning_struct.ops.spectral.symbols._phases` at the
    frequencies ``freqs (F, d)``: taps in the row-major order of ``positions`` (integer positions
    per dim), aliases in the row-major order of ``range(s_i)`` (the column blocks of
    :func:`conv_symbol`).
    """
    E: torch.Tensor | None = None
    for i in range(len(n)):
        Ei = _phases(n[i], n[i] // s[i], s[i], freqs[:, i], positions[i].to(freqs.device), cdtype)  # (F, s_i, k_i)
        if E is None:
            E = Ei
        else:
            F, S, T = E.shape
            E = (E[:, :, None, :, None] * Ei[:, None, :, None, :]).reshape(F, S * Ei.shape[1], T * Ei.shape[2])
    assert E is not None
    return E.reshape(-1, E.shape[-1])


def _real_times(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Complex ``X (G, F, a)`` times real ``W (G, a, b)`` as one real GEMM per group on ``2F`` rows."""
    G, F, a = X.shape
    Xr = torch.view_as_real(X).transpose(-1, -2).reshape(G, 2 * F, a)  # rows: real, imag per f
    Y = (Xr @ W).reshape(G, F, 2, -1).transpose(-1, -2).contiguous()
    return torch.view_as_complex(Y)


class _Operators:
    """The Gram operators of one layer at any set of frequencies, without forming a symbol.

    ``B(theta) = [B_1 .. B_S]`` with alias blocks ``B_a = sum_k phi_{a,k} W_k`` (``phi`` the phases
    of :func:`_phase_rows`, scaled by ``S^{-1/2}``), so a row vector times ``B^H`` then ``B`` is two
    real GEMMs with the kernel itself reshaped to ``(C_out, K*C_in)`` (all frequencies and both
    signs stacked as rows) around two tiny per-frequency contractions with ``phi``. Per Lanczos
    step that is ``4 F C_out K C_in`` real multiply-adds at GEMM speed, where the block-symbol route
    reads ``F C_out S C_in`` complex entries twice at memory speed after forming them. A 1x1
    kernel has the same symbol at every frequency: one problem with ``B = W``.
    """

    def __init__(self, w: torch.Tensor, geom: _Geom, cdtype: torch.dtype, one_by_one: bool) -> None:
        self.geom, self.cdtype, self.one_by_one = geom, cdtype, one_by_one
        G, co, ci = geom.g, geom.co, geom.ci
        self.K = 1 if one_by_one else math.prod(geom.k)
        self.S = 1 if one_by_one else geom.S
        wk = w.reshape(G, co, ci, self.K).transpose(-1, -2)  # (G, co, K, ci)
        self.Wm = wk.reshape(G, co, self.K * ci)  # x W_k for all k in one GEMM (a copy unless 1x1)
        self.WmT = self.Wm.transpose(-1, -2)  # a view: the GEMM reads it transposed
        self.side = "out" if co <= self.S * ci else "in"
        self.c = co if self.side == "out" else self.S * ci
        self.exact = self.c < config.exact_below(w.dtype)  # small c: exact eigenvalues, no vectors
        self.positions = [torch.arange(k, device=w.device) * dl for k, dl in zip(geom.k, geom.dil)]

    def phases(self, freqs: torch.Tensor) -> torch.Tensor:
        """``(F, S, K)`` alias-tap phases scaled by ``S^{-1/2}`` (ones for a 1x1 kernel)."""
        if self.one_by_one:
            return torch.ones(len(freqs), 1, 1, dtype=self.cdtype, device=freqs.device)
        E = _phase_rows(freqs, self.geom.n, self.geom.s, self.positions, self.cdtype)
        return E.reshape(len(freqs), self.S, self.K) * self.S**-0.5

    def apply(self, phi: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Row action ``X -> X H`` on ``X (F*G, 1, c)`` with ``H = (B B^H)^T`` on the output side and
        ``H = B^H B`` on the input side (the conventions of :func:`_gram_apply`)."""
        G, co, ci, K, S = self.geom.g, self.geom.co, self.geom.ci, self.K, self.S
        F = phi.shape[0]
        phi_c = phi.conj().resolve_conj()
        phi_t = phi.transpose(1, 2).contiguous()  # (F, K, S)
        phi_ct = phi_c.transpose(1, 2).contiguous()

        def out_side(X: torch.Tensor) -> torch.Tensor:
            # y = conj(conj(x) B) B^T = sum_k (sum_a phi_{a,k} conj(phi) x W_k ...) W_k^T
            U = _real_times(X.reshape(F, G, co).transpose(0, 1), self.Wm).reshape(G, F, K, ci)
            T = phi_c @ U  # (G, F, S, ci) = conj(conj(x) B_a)
            Z = phi_t @ T  # (G, F, K, ci)
            Y = _real_times(Z.reshape(G, F, K * ci), self.WmT)  # (G, F, co)
            return Y.transpose(0, 1).reshape(F * G, 1, co)

        def in_side(X: torch.Tensor) -> torch.Tensor:
            # u = x B^H = sum_k (sum_a conj(phi_{a,k}) x_a) W_k^T, then y_a = u B_a
            Xa = X.reshape(F, G, S, ci).transpose(0, 1)  # (G, F, S, ci)
            Z = phi_ct @ Xa  # (G, F, K, ci)
            u = _real_times(Z.reshape(G, F, K * ci), self.WmT)  # (G, F, co)
            U = _real_times(u, self.Wm).reshape(G, F, K, ci)
            Y = phi @ U  # (G, F, S, ci)
            return Y.transpose(0, 1).reshape(F * G, 1, S * ci)

        return out_side if self.side == "out" else in_side

    def grams(self, phi: torch.Tensor) -> torch.Tensor:
        """The side's Hermitian Gram ``(F*G, c, c)`` (``B B^H`` or ``B^H B``; for small ``c``)."""
        G, co, ci, K, S = self.geom.g, self.geom.co, self.geom.ci, self.K, self.S
        F = phi.shape[0]
        Wk = self.Wm.reshape(G, co, K, ci).permute(0, 2, 1, 3).reshape(G, K, co * ci).to(self.cdtype)
        B = (phi.reshape(1, F * S, K) @ Wk).reshape(G, F, S, co, ci).permute(1, 0, 3, 2, 4)
        B = B.reshape(F * G, co, S * ci)  # columns (a, ci) as in conv_symbol
        return B @ B.mH if self.side == "out" else B.mH @ B


def _solve(
    ops: _Operators,
    freqs: torch.Tensor,
    starts: torch.Tensor,
    rtol: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Top eigenvalues ``(F, G)``, Ritz vectors ``(F, G, c)`` and the most steps over the chunks,
    for the frequencies ``freqs`` (rows of :func:`_half_frequencies`), from the rows ``starts``."""
    geom, c, exact = ops.geom, ops.c, ops.exact
    vdtype = ops.cdtype  # the rows are complex (a 1x1 kernel's too: one code path)
    # entries per frequency held at once: the GEMM outputs (K C_in) and ~32 Lanczos vectors
    per_freq = geom.g * (ops.K * max(geom.ci, geom.co) * 2 + c * (c if exact else 32))
    chunk = max(1, config.norm_chunk_bytes // (8 * per_freq))
    F = freqs.shape[0]
    ranges = [
        r for r in torch.arange(F, device=freqs.device).tensor_split(min(F, workers(freqs.device))) if len(r)
    ]

    def work(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        phi = ops.phases(freqs[sel])
        if exact:  # small c: the top eigenvalue of the Gram itself, no vectors to keep
            top = _eigvalsh_desc(ops.grams(phi), overwrite=True)[..., 0]
            return top.reshape(len(sel), geom.g), torch.zeros(len(sel), geom.g, 0, dtype=vdtype), 0
        P = len(sel) * geom.g
        X = starts[sel].reshape(P, 1, c).to(vdtype)
        basis: list[torch.Tensor] = []
        # from starts next to the answers: the first test compares the 2-step Ritz value with the
        # start's Rayleigh quotient
        alpha, beta = _lanczos(ops.apply(phi), X, c, rtol * _WARM_RTOL, first_check=0, every=1, basis=basis)
        vals, vecs = _ritz(alpha, beta, basis)
        return vals.reshape(len(sel), geom.g), vecs.reshape(len(sel), geom.g, c), alpha.shape[0]

    def worker(i: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        return [work(sub) for sub in ranges[i].split(chunk)]

    if len(ranges) == 1:  # one frequency (a 1x1 kernel): its GEMMs get the caller's threads
        with all_threads():
            results = worker(0)
    else:
        results = [r for part in parallel_map(worker, list(range(len(ranges))), freqs.device) for r in part]
    vals = torch.cat([r[0] for r in results])
    vecs = torch.cat([r[1] for r in results])
    return vals, vecs, max(r[2] for r in results)


@cpu_single_threaded
def warm_conv_spectral_norm(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    state: NormState | None = None,
    dtype: torch.dtype | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, NormState]:
    """Operator norm of the periodic-boundary convolution, warm from the ``state`` of the last call.

    The same value as :func:`conv_spectral_norm` (to the Lanczos tolerance), computed as the
    module docstring says: the first call is cold (every frequency from a random start); later
    calls on the same geometry restart from the previous Ritz vectors and skip the frequencies
    that provably cannot hold the maximum after the weights' change. Small ``c`` (below
    ``config.exact_below``) takes exact eigenvalues (of the frequencies that still count).

    Args:
        weight, input_size, stride, dilation, groups: as in :func:`conv_spectrum`.
        state: what the last call on this layer returned (``None``: a cold run).
        dtype: ``torch.float32`` (default) or ``torch.float64``.
        rtol: stagnation tolerance of the Lanczos runs (default ``config.lanczos_rtol``).
        seed: seed of the cold run's random starts.

    Returns:
        ``(norm, state)``: the 0-d norm and the state to pass to the next call.
    """
    check_number(rtol, "rtol", minimum=0, maximum=1, open_min=True, open_max=True, optional=True)
    warm = state is not None and state.weight is not None
    # a warm call finds NaN/inf through the weight change below instead of a pass of its own
    geom = _geometry(weight, input_size, stride, dilation, groups, check_finite=not warm)
    rdt = _compute_dtype(weight, dtype)
    cdt = _complex(rdt)
    tol = float(rtol) if rtol is not None else config.lanczos_rtol(rdt)
    key = (tuple(weight.shape), geom, rdt, weight.device)
    w = weight.detach().to(rdt)
    if state is None or state.key != key or state.weight is None:
        if warm:
            _check_weight(weight)
        # cold: conv_spectral_norm's own route (formed symbols pay off over its many steps)
        vals, vecs = _lanczos_norm(weight, geom, rdt, "auto", seed, tol, vectors=True)
        assert vecs is not None
        exact = vecs.shape[-1] == 0  # the exact path keeps no vectors
        sigma = vals.clamp_min(0).double().sqrt()
        upper = sigma * (1 + (_EXACT_MARGIN if exact else _COLD_MARGIN))
        F = vals.shape[0]
        new = NormState(key, w.clone(), vecs.to(cdt), upper, sigma, recomputed=F, frequencies=F)
        return vals.amax().clamp_min(0).sqrt().to(rdt), new

    assert state.vectors is not None and state.upper is not None and state.lower is not None
    one_by_one = all(k == 1 for k in geom.k)
    ops = _Operators(w, geom, cdt, one_by_one)
    freqs = (
        torch.zeros(1, geom.d, dtype=torch.int64, device=weight.device)
        if one_by_one
        else _half_frequencies(geom, weight.device)
    )
    dw = (w - state.weight).reshape(-1, ops.K)
    tap_gram = (dw.T @ dw).double()  # (K, K): <dW_k, dW_l>, one pass over the change
    if not bool(torch.isfinite(tap_gram).all()):
        _check_weight(weight)  # raises: NaN/inf in the weights
    # Weyl: each frequency's top value moved by at most ||dB(theta)||_F, whose square is
    # sum_a phi_a^T G conj(phi_a) = c^T G c + s^T G s for phi = c + i s (G real symmetric)
    phi = ops.phases(freqs)
    parts = torch.cat([phi.real, phi.imag], 1).to(rdt)  # (F, 2S, K)
    q = ((parts @ tap_gram.to(rdt)) * parts).sum((1, 2)).double()
    delta = q.clamp_min(0).sqrt() * (1 + 1e-5)  # the allowance covers the rounding of q
    delta = delta[:, None]  # the whole weight's change bounds every group's
    # the old Ritz values minus the move bound the new norm from below; a frequency whose upper
    # estimate plus its move stays under that cannot hold the maximum
    upper, lower = state.upper + delta, state.lower - delta
    todo = torch.nonzero(upper.amax(1) >= lower.amax()).flatten()
    vals, vecs, steps = _solve(ops, freqs[todo], state.vectors[todo], tol)
    vectors = state.vectors.clone()
    vectors[todo] = vecs.to(vectors.dtype)
    sigma = vals.clamp_min(0).double().sqrt()
    upper[todo] = sigma * (1 + (_EXACT_MARGIN if ops.exact else _WARM_MARGIN))
    lower[todo] = sigma
    F = freqs.shape[0]
    new = NormState(key, w.clone(), vectors, upper, lower, recomputed=len(todo), frequencies=F, steps=steps)
    return vals.amax().clamp_min(0).sqrt().to(rdt), new


def warm_linear_norm(
    weight: torch.Tensor, *, state: NormState | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, NormState]:
    """Largest singular value of a ``(out, in)`` matrix, warm from ``state`` (a 1x1 conv on one point)."""
    return warm_conv_spectral_norm(weight[..., None], 1, state=state, dtype=dtype)
