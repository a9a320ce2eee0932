"""The result type of the spectral ops, and the reshape bound."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lightning_struct.ops.spectral.geometry import _check_weight

__all__ = ["SPECTRUM_STATS", "ConvSpectrum", "reshape_bound"]

#: the scalar statistics of :meth:`ConvSpectrum.stats`, in that order
SPECTRUM_STATS: tuple[str, ...] = (
    "sigma_max",
    "sigma_min",
    "condition_number",
    "stable_rank",
    "effective_rank",
    "reshape_bound",
)


@dataclass
class ConvSpectrum:
    """All singular values of a convolution (or linear) operator, per frequency.

    Attributes:
        sigma: ``(F, G, r)`` singular values, descending within each ``(frequency, group)``;
            ``F`` frequencies of the coarse half grid (row-major), ``G`` groups,
            ``r = min(C_out/G, S*C_in/G)``.
        multiplicity: ``(F,)`` int64: 2 for a frequency that also stands for its conjugate,
            1 otherwise; ``sum(multiplicity) == prod(grid)``.
        grid: the coarse frequency grid ``input_size / stride`` (full size, not halved).
        reshape_sigma_max: ``max_g sigma_max(W_g.reshape(C_out/G, -1))`` (what
            ``torch.nn.utils.spectral_norm`` normalises by).
        kernel_numel: ``prod(kernel)``; ``reshape_bound = sqrt(kernel_numel) * reshape_sigma_max``.
        method: ``"gram"``, ``"svd"`` or ``"linear"``.
        u, vh: optional per-frequency singular vectors of the block symbol:
            ``u`` ``(F, G, C_out/G, r)``, ``vh`` ``(F, G, r, S*C_in/G)`` (see :func:`conv_spectrum`).
    """

    sigma: torch.Tensor
    multiplicity: torch.Tensor
    grid: tuple[int, ...]
    reshape_sigma_max: torch.Tensor | Callable[[], torch.Tensor] = field(repr=False)
    kernel_numel: int
    method: str
    u: torch.Tensor | None = field(default=None, repr=False)
    vh: torch.Tensor | None = field(default=None, repr=False)

    # -- the multiset ----------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of singular values of the operator (``min(rows, cols)`` of its matrix)."""
        return int(self.multiplicity.sum()) * self.sigma.shape[1] * self.sigma.shape[2]

    def values(self) -> torch.Tensor:
        """Every singular value of the operator (the full multiset), 1-D, descending."""
        flat = self.sigma.reshape(self.sigma.shape[0], -1)
        full = flat.repeat_interleave(self.multiplicity.to(flat.device), dim=0).reshape(-1)
        return full.sort(descending=True).values

    def per_frequency_max(self) -> torch.Tensor:
        """``(F,)`` largest singular value at each half-grid frequency (over groups)."""
        return self.sigma.amax(dim=(1, 2))

    # -- statistics (0-d tensors) ------------------------------------------------------------
    @property
    def sigma_max(self) -> torch.Tensor:
        """Operator norm (largest singular value)."""
        return self.sigma.amax()

    @property
    def sigma_min(self) -> torch.Tensor:
        """Smallest singular value (0 for a rank-deficient operator)."""
        return self.sigma.amin()

    @property
    def lambda_max(self) -> torch.Tensor:
        """Largest eigenvalue of ``K^T K`` (``sigma_max**2``)."""
        return self.sigma_max**2

    @property
    def frobenius_sq(self) -> torch.Tensor:
        """``sum sigma^2`` over the full multiset (= ``||K||_F^2``)."""
        w = self.multiplicity.to(self.sigma.dtype)
        return (self.sigma.square().sum(dim=(1, 2)) * w).sum()

    @property
    def condition_number(self) -> torch.Tensor:
        """``sigma_max / sigma_min`` (inf for a rank-deficient operator)."""
        smin = self.sigma_min
        return torch.where(smin > 0, self.sigma_max / smin.clamp_min(torch.finfo(smin.dtype).tiny), torch.inf)

    @property
    def stable_rank(self) -> torch.Tensor:
        """``sum sigma^2 / sigma_max^2`` in ``[1, count]`` (0 for the zero operator)."""
        smax = self.sigma_max
        return torch.where(
            smax > 0, self.frobenius_sq / smax.square().clamp_min(torch.finfo(smax.dtype).tiny), 0.0
        )

    @property
    def effective_rank(self) -> torch.Tensor:
        """Roy & Vetterli (2007): ``exp(H(p))`` with ``p_i = sigma_i / sum sigma`` over the full multiset."""
        w = self.multiplicity.to(self.sigma.dtype)[:, None, None]
        total = (self.sigma * w).sum()
        if not bool(total > 0):
            return torch.zeros((), dtype=self.sigma.dtype, device=self.sigma.device)
        p = self.sigma / total
        ent = -(w * torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), 0.0)).sum()
        return torch.exp(ent)

    @property
    def reshape_bound(self) -> torch.Tensor:
        """``sqrt(prod k) * sigma_max(W reshaped)``: a true upper bound on the operator norm.

        Computed on first access (an SVD of the reshaped kernel costs as much as the spectrum of a
        small layer) and kept.
        """
        if callable(self.reshape_sigma_max):
            self.reshape_sigma_max = self.reshape_sigma_max()
        return math.sqrt(self.kernel_numel) * self.reshape_sigma_max

    def stats(self) -> dict[str, float]:
        """The scalar statistics :data:`SPECTRUM_STATS` as Python floats (as logged by ``SpectralMonitor``)."""
        return {name: float(getattr(self, name)) for name in SPECTRUM_STATS}


def reshape_bound(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``sqrt(prod k) * max_g sigma_max(W_g.reshape(C_out/G, -1))``, 0-d.

    A true upper bound on the operator norm of the convolution for any stride, dilation and
    padding (Tsuzuku et al. 2018: the output is ``W_mat`` applied to ``prod k`` shifted copies of
    the input, each of norm ``<= ||x||``).
    """
    _check_weight(weight)
    return math.sqrt(math.prod(weight.shape[2:])) * _reshape_sigma_max(weight, groups)


def _reshape_sigma_max(weight: torch.Tensor, groups: int) -> torch.Tensor:
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    mats = w.reshape(groups, w.shape[0] // groups, -1)
    return torch.linalg.matrix_norm(mats, ord=2).amax()
