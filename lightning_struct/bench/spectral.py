"""``lightning-struct bench spectral``: exact conv spectra, ours (LFA in torch) vs numpy baselines.

Same process, same weights (Gaussian, ResNet-style ``sqrt(2 / (9 c))`` scale, float32), 3x3
kernels, stride 1, periodic boundary. Per grid point ``(c, n)`` in ``{(64, 56), (128, 28),
(256, 14), (512, 7)}`` (``c -> c`` channels on an ``n x n`` input):

* **ours full**: :func:`lightning_struct.ops.spectral.conv_singular_values` - every singular value
  of the operator, sorted (float32, ``method="auto"`` = Gram route: per-frequency Hermitian Gram
  symbols from the kernel's autocorrelation taps, ``eigvalsh``, half spectrum by conjugate
  symmetry, chunks in parallel; eigenvalues by SciPy's LAPACK from
  ``config.scipy_lapack_from`` channels on);
* **ours norm**: :func:`lightning_struct.ops.spectral.conv_spectral_norm` (Lanczos, adaptive steps);
* **numpy Sedghi FFT** (Sedghi et al. 2019, written from the formula): ``fft2`` of the kernel in
  ``(k, k, C_in, C_out)`` layout padded to ``n x n`` (float32 in, so complex64 with numpy >= 2),
  then ``np.linalg.svd(..., compute_uv=False)`` on all ``n^2`` frequencies;
* **numpy LFA** (van Betteray et al. 2025, written from the formula): the symbol as two
  ``np.tensordot`` with the phase matrix ``exp(2 pi i t j / n)`` of the tap offsets ``t``
  (complex128), then ``np.linalg.svd(..., compute_uv=False)``;
* **limit: the eigensolver alone**: the batched ``eigvalsh`` ours calls, on the very Gram
  symbols ours factorizes (:func:`~lightning_struct.ops.spectral.full.gram_symbols`, formed and
  copied outside the timing), in the same thread pool: what the full spectrum would cost if
  everything but the solver were free. ``extra`` holds ``ours/limit`` (target 1.25) and the
  time to form the symbols alone (``gram_formation_s``);
* **explicit SVD** (small ``n`` only, extra rows ``explicit c8/c16``): the unrolled
  ``(c n^2) x (c n^2)`` matrix of the circular conv, ``torch.linalg.svdvals``.

A numpy baseline is timed with its BLAS limited to one thread (``threadpoolctl``) and, in the
full run, also at its default threads; the faster counts, so a baseline is never slowed down by
OpenBLAS threading of small matrices. Ours uses the intra-op threads as independent workers
(see :mod:`lightning_struct.ops.spectral._pool`).
Ours runs before and after the baselines; the faster turn counts.

Also (full run only): **resnet50 norms** - the operator norms of all 53 convolutions of a
torchvision ResNet-50 (``weights=None``) at their real resolutions for a 224x224 input (target
1 s, reported as ``target_s``), against the exact full spectra of the same layers
(``baseline = ours full``), with the largest relative error of the fast path in ``extra``.

``--quick``: the grid points (128, 28) and (256, 14) against both numpy baselines and one
explicit-SVD row.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_struct.bench._harness import Row, median_time
from lightning_struct.ops.spectral import conv_singular_values, conv_spectral_norm, explicit_conv_matrix

TITLE = "exact conv spectra (3x3, stride 1, periodic): ours (LFA, torch) vs numpy Sedghi FFT / numpy LFA / explicit SVD"

GRID: tuple[tuple[int, int], ...] = ((64, 56), (128, 28), (256, 14), (512, 7))
QUICK_GRID: tuple[tuple[int, int], ...] = ((128, 28), (256, 14))


# ------------------------------------------------------------------------------------- baselines
def sedghi_numpy(kernel_hwio: np.ndarray, n: int) -> np.ndarray:
    """Singular values per frequency, Sedghi et al. (2019): ``svd(fft2(kernel, (n, n)))``.

    Args:
        kernel_hwio: ``(k, k, C_in, C_out)``.

    Returns:
        ``(n, n, min(C_in, C_out))``.
    """
    transforms = np.fft.fft2(kernel_hwio, (n, n), axes=(0, 1))
    return np.linalg.svd(transforms, compute_uv=False)


def lfa_numpy(weight: np.ndarray, n: int) -> np.ndarray:
    """Singular values per frequency by the LFA symbol (van Betteray et al. 2025), numpy.

    The symbol ``sum_{u,v} w[:, :, u, v] exp(i (theta_1 t_u + theta_2 t_v))`` with tap offsets
    ``t = -(k//2) .. k-1-k//2`` is two ``tensordot`` with the phase matrix
    ``P[t, j] = exp(2 pi i t j / n)``, transposed to ``(n, n, C_out, C_in)``.

    Args:
        weight: ``(C_out, C_in, k, k)``.
    """
    k = weight.shape[-1]
    t = np.arange(k) - k // 2
    phases = np.exp(2j * np.pi * np.outer(t, np.arange(n)) / n)  # (k, n)
    d = np.tensordot(weight, phases, axes=([3], [0]))  # (C_out, C_in, k, n): kernel width done
    d2 = np.tensordot(d, phases, axes=([2], [0]))  # (C_out, C_in, n, n): kernel height done
    return np.linalg.svd(d2.transpose(2, 3, 0, 1), compute_uv=False)


def gram_iteration_bound(weight: torch.Tensor, n: int, iters: int = 6) -> torch.Tensor:
    """Upper bound of the periodic conv's norm by Gram iteration (Delattre et al. 2023), torch.

    Written from the paper's formula: per frequency the ``rfft2`` of the kernel ``B(theta)``,
    then ``G_{t+1} = G_t^H G_t`` with ``G_0 = B``, each ``G_t`` divided by its Frobenius norm
    ``r_t`` first (the logs carried along), so ``sigma_1(B) <= (||G_T||_F prod_t r_t^{2^{T-t}})^{2^-T}``;
    the bound is the largest over the frequencies. It tightens towards ``sigma_1`` as ``T`` grows.
    """
    G = torch.fft.rfft2(weight.to(torch.float32), s=(n, n)).permute(2, 3, 0, 1).reshape(-1, *weight.shape[:2])
    log_acc = torch.zeros(G.shape[0], dtype=torch.float64)
    for _ in range(iters):
        r = torch.linalg.matrix_norm(G)  # Frobenius, per frequency
        log_acc = 2 * (log_acc + r.double().log())
        G = G / r[:, None, None]
        G = G.mH @ G
    log_bound = (torch.linalg.matrix_norm(G).double().log() + log_acc) / 2**iters
    return log_bound.max().exp()


def _best_numpy_time(fn: Callable[[], Any], repeats: int, both: bool) -> float:
    """Median time of ``fn`` with numpy's BLAS limited to one thread and, if ``both``, at its
    default threads too; the faster of the two counts."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        best = median_time(fn, repeats=repeats, warmup=0)
    if both:
        best = min(best, median_time(fn, repeats=repeats, warmup=0))
    return best


def _weight(c: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, c, k, k, generator=g) * math.sqrt(2.0 / (k * k * c))


def _repeats_for(seconds: float) -> int:
    return 1 if seconds > 4 else (3 if seconds > 0.5 else 5)


# ------------------------------------------------------------------------------------- cases
def _grid_rows(c: int, n: int, quick: bool) -> list[Row]:
    w = _weight(c)
    wn = w.numpy()
    hwio = np.ascontiguousarray(wn.transpose(2, 3, 1, 0))
    case = f"c{c} n{n}"

    def ours_full() -> torch.Tensor:
        return conv_singular_values(w, (n, n))

    def ours_norm() -> torch.Tensor:
        return conv_spectral_norm(w, (n, n))

    # accuracy against the numpy LFA values (complex128; all values sorted)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        t0 = time.perf_counter()
        ref = np.sort(lfa_numpy(wn, n).ravel())[::-1].copy()
        probe = time.perf_counter() - t0
    ours = ours_full().double().numpy()
    full_err = float(np.abs(ours - ref).max() / ref[0])
    norm_err = float(abs(float(ours_norm()) - ref[0]) / ref[0])

    reps = 1 if quick else _repeats_for(probe)
    t_full = median_time(ours_full, repeats=3 if quick else 5, warmup=0)
    t_norm = median_time(ours_norm, repeats=3 if quick else 5, warmup=1)
    t_sedghi = _best_numpy_time(lambda: sedghi_numpy(hwio, n), reps, both=not quick)
    t_lfa = min(probe, _best_numpy_time(lambda: lfa_numpy(wn, n), reps, both=not quick))
    t_full = min(t_full, median_time(ours_full, repeats=3, warmup=0))  # a second turn after the baselines
    t_limit, t_form = _limit_times(w, n, repeats=3 if quick else 5)
    extra_full = {"max_abs_err/sigma_max": full_err}
    return [
        Row(f"full {case}", t_full, "numpy Sedghi FFT", t_sedghi, extra_full),
        Row(f"full {case}", t_full, "numpy LFA", t_lfa, extra_full),
        Row(f"full {case}", t_full, "limit: the eigensolver alone", t_limit,
            {"ours/limit": t_full / t_limit, "gram_formation_s": t_form, "target_ours/limit": 1.25}),  # fmt: skip
        Row(f"norm {case}", t_norm, "numpy Sedghi FFT", t_sedghi, {"rel_err": norm_err}),
        Row(f"norm {case}", t_norm, "ours full", t_full, {"rel_err": norm_err}),
        _gram_iteration_row(w, n, case, t_norm, ref[0]),
    ]


def _gram_iteration_row(w: torch.Tensor, n: int, case: str, t_norm: float, exact: float) -> Row:
    """Ours (exact norm) against Gram iteration (an upper bound) at the iteration count that brings
    the bound within 1% of the exact value (at most 8), time and value side by side."""
    iters, bound = 2, float(gram_iteration_bound(w, n, 2))
    while bound > 1.01 * exact and iters < 8:
        iters += 1
        bound = float(gram_iteration_bound(w, n, iters))
    t_gram = median_time(lambda: gram_iteration_bound(w, n, iters), repeats=3, warmup=1)
    return Row(
        f"norm {case}",
        t_norm,
        f"Gram iteration x{iters} (Delattre 2023; a bound)",
        t_gram,
        {"exact": exact, "gram_bound": bound, "bound/exact": bound / exact},
    )


def _limit_times(w: torch.Tensor, n: int, repeats: int) -> tuple[float, float]:
    """The hardware limit of the full spectrum: the batched eigensolver alone on the very Gram
    symbols ours factorizes (fresh copies made outside the timing), and, apart, the time to form
    those symbols."""
    from lightning_struct.ops.spectral.full import gram_symbols, solve_gram_symbols

    symbols = gram_symbols(w, (n, n))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        copies = [m.clone() for m in symbols]
        t0 = time.perf_counter()
        solve_gram_symbols(copies)
        times.append(time.perf_counter() - t0)
    t_form = median_time(lambda: gram_symbols(w, (n, n)), repeats=repeats, warmup=1)
    return statistics.median(times[1:]), t_form


def _explicit_row(c: int, n: int) -> Row:
    w = _weight(c)
    M = explicit_conv_matrix(w.double(), (n, n))

    def explicit() -> torch.Tensor:
        return torch.linalg.svdvals(explicit_conv_matrix(w, (n, n)))

    def explicit_one_thread() -> torch.Tensor:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return explicit()
        finally:
            torch.set_num_threads(threads)

    def ours() -> torch.Tensor:
        return conv_singular_values(w, (n, n))

    ref = torch.linalg.svdvals(M)
    err = float((ours().double() - ref).abs().max() / ref[0])
    t_ours = median_time(ours, repeats=5, warmup=1)
    # the faster of LAPACK at default threads and at one thread (small SVDs thread badly)
    t_explicit = min(
        median_time(explicit, repeats=3, warmup=1), median_time(explicit_one_thread, repeats=3, warmup=1)
    )
    return Row(
        f"explicit c{c} n{n}", t_ours, "explicit SVD (torch)", t_explicit, {"max_abs_err/sigma_max": err}
    )


def resnet50_layers(
    image_size: int = 224, model: torch.nn.Module | None = None
) -> list[tuple[str, torch.nn.Conv2d, tuple[int, int]]]:
    """``(name, conv, input_size)`` of every convolution of ``model`` (default: a random torchvision
    ResNet-50, seed 0); the sizes come from one eval-mode forward, the model's mode is restored."""
    import torchvision

    if model is None:
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None)
    was_training = model.training
    model.eval()
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:]))
        )
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    model.train(was_training)
    convs = dict(model.named_modules())
    return [(name, convs[name], hw) for name, hw in sizes.items()]  # type: ignore[misc]


def _resnet50_row() -> Row:
    from lightning_struct.ops.spectral import conv_spectrum

    layers = resnet50_layers()

    def norms() -> list[float]:
        return [
            float(conv_spectral_norm(m.weight, hw, stride=m.stride, dilation=m.dilation, groups=m.groups))
            for _, m, hw in layers
        ]

    def full() -> list[float]:
        return [
            float(
                conv_spectrum(m.weight, hw, stride=m.stride, dilation=m.dilation, groups=m.groups).sigma_max
            )
            for _, m, hw in layers
        ]

    fast, exact = norms(), full()
    err = max(abs(a - b) / b for a, b in zip(fast, exact))
    t_norms = median_time(norms, repeats=3, warmup=0)
    t_full = median_time(full, repeats=1, warmup=0)
    return Row(
        f"resnet50 norms ({len(layers)} convs @224)",
        t_norms,
        "ours full",
        t_full,
        {"max_rel_err": err, "target_s": 1.0},
    )


def _resnet50_warm_rows(moves: tuple[float, ...] = (1e-3, 1e-2), calls: int = 3) -> list[Row]:
    """The monitor's case: all 53 ResNet-50 norms again after the weights moved.

    Each move adds to every conv weight its own gradient direction (one backward pass of a random
    batch) scaled to ``move * ||W||``: a training step of that relative size. Per move, ``calls``
    calls: ours warm (:func:`~lightning_struct.ops.spectral.warm_conv_spectral_norm` from the last
    call's state) against :func:`conv_spectral_norm` from scratch on the same weights; the error
    is against float64 Lanczos norms at ``rtol=1e-7``.
    """
    import torchvision

    from lightning_struct.ops.spectral import warm_conv_spectral_norm

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    layers = resnet50_layers(model=net)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    kw = [dict(stride=m.stride, dilation=m.dilation, groups=m.groups) for _, m, _ in layers]
    states: dict[str, Any] = {}

    def warm() -> list[float]:
        out = []
        for (name, m, hw), k in zip(layers, kw):
            v, states[name] = warm_conv_spectral_norm(m.weight, hw, state=states.get(name), **k)
            out.append(float(v))
        return out

    def scratch() -> list[float]:
        return [float(conv_spectral_norm(m.weight, hw, **k)) for (_, m, hw), k in zip(layers, kw)]

    def cold() -> None:
        states.clear()
        warm()

    t_cold = median_time(cold, repeats=2, warmup=0)  # the first call of a fresh state, twice
    rows = []
    for move in moves:
        t_warm, t_scratch, errs, frac = [], [], [], []
        for _ in range(calls):
            with torch.no_grad():
                for _, m, _ in layers:
                    m.weight.add_(m.weight.grad * (move * m.weight.norm() / m.weight.grad.norm()))
            t0 = time.perf_counter()
            values = warm()
            t_warm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scratch()
            t_scratch.append(time.perf_counter() - t0)
            ref = [
                float(conv_spectral_norm(m.weight, hw, dtype=torch.float64, rtol=1e-7, **k))
                for (_, m, hw), k in zip(layers, kw)
            ]
            errs.append(max(abs(a - b) / b for a, b in zip(values, ref)))
            frac.append(sum(s.recomputed for s in states.values()) / sum(s.frequencies for s in states.values()))
        rows.append(
            Row(
                f"resnet50 warm norms, move {move:g}",
                statistics.median(t_warm),
                "conv_spectral_norm from scratch",
                statistics.median(t_scratch),
                {
                    "cold_s": t_cold,
                    "max_rel_err": max(errs),
                    "recomputed_frequencies": statistics.median(frac),
                    "target_s": 0.3,
                    "target_cold_s": 1.0,
                },
            )
        )
    return rows


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    """The benchmark rows (see the module docstring)."""
    if device != "cpu":
        raise ValueError(f"bench spectral: device={device!r}; the numpy baselines run on 'cpu' only")
    rows: list[Row] = []
    for c, n in QUICK_GRID if quick else GRID:
        rows += _grid_rows(c, n, quick)
    rows.append(_explicit_row(8, 8))
    if not quick:
        rows.append(_explicit_row(16, 8))
        rows.append(_resnet50_row())
        rows += _resnet50_warm_rows()
    else:
        rows += _resnet50_warm_rows(moves=(1e-3,), calls=2)
    return rows
