"""ACDC structured linear layers (Moczulski, Denil, Appleyard, de Freitas, ICLR 2016).

* :class:`ACDC` - one factor ``y = IDCT(d * DCT(a * x + a_bias) + d_bias)`` on ``N`` features:
  ``2N`` parameters (``4N`` with biases) instead of ``N^2``.
* :class:`ACDCStack` - ``K`` factors with fixed random permutations and (optionally) ReLU
  between them, a drop-in replacement for ``nn.Linear(in_features, out_features)``.
* :class:`ACDCConv1x1` - an :class:`ACDCStack` applied to every pixel, a replacement for a
  ``1 x 1`` convolution.

The math and the fast fused forward/backward live in :mod:`lightning_struct.ops.acdc`.
Parameters are stored in their natural (feature) order; ``a``/``d`` are initialised
identity-centred, ``N(1, sigma^2)``, and the biases at zero, as recommended by the paper (a
zero-mean initialisation does not train deep stacks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_struct._checks import check_int, check_number
from lightning_struct.ops.acdc import acdc_dense_matrix, acdc_stack, prepare_permutations
from lightning_struct.ops.dct import dct_matrix
from lightning_struct.ops.portable import acdc_stack_portable, is_tracing

__all__ = ["ACDC", "ACDCConv1x1", "ACDCStack"]


class ACDCStack(nn.Module):
    """A stack of ``K`` ACDC factors: a structured replacement for ``nn.Linear(in, out)``.

    With ``N = max(in_features, out_features)``::

        x_1 = pad(x, N)                       # zeros appended to the features
        y_k = IDCT(d_k * DCT(a_k * x_k + a_bias_k) + d_bias_k)
        x_{k+1} = relu(y_k)[..., perm_k]      # relu / permutation only if enabled
        out = y_K[..., :out_features]         # crop

    i.e. rectangular maps are square ``N x N`` stacks whose input is zero-padded and whose
    output is cropped (the same as the paper's CaffeNet layers, where fc6 maps 9216 -> 4096).
    There is no ReLU or permutation after the last factor: put the layer's own activation
    after it, as after a ``Linear``.

    Args:
        in_features: input size.
        out_features: output size (default ``in_features``).
        n_factors: ``K`` (the paper uses 12 for CaffeNet's fc6/fc7).
        relu: ReLU between factors.
        permute: fixed random permutations between factors (``randperm`` from a generator
            seeded with ``seed``; stored as the int64 buffer ``permutations`` of shape
            ``(K-1, N)``, so they travel with the state dict).
        sigma: std of the identity-centred initialisation ``a, d ~ N(1, sigma^2)``.
        bias: learn ``a_bias`` and ``d_bias`` (initialised at zero).
        seed: seed of the permutations (the diagonals use the global RNG, like every
            PyTorch layer).
        device, dtype: factory kwargs for the parameters.

    Shapes:
        input ``(..., in_features)`` -> output ``(..., out_features)``, in the parameters'
        dtype (float32/float64; the input is cast).

    Parameters: ``K * 2N`` (``K * 4N`` with biases), e.g. 196,608 for ``N = 4096, K = 12``
    against 16,781,312 for the dense ``Linear(4096, 4096)``.
    """

    permutations: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int | None = None,
        n_factors: int = 12,
        relu: bool = True,
        permute: bool = True,
        sigma: float = 0.01,
        bias: bool = True,
        seed: int = 0,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "ACDCStack"
        self.in_features: int = check_int(in_features, "in_features", where, minimum=1)  # type: ignore[assignment]
        self.out_features: int = check_int(  # type: ignore[assignment]
            out_features if out_features is not None else in_features, "out_features", where, minimum=1
        )
        self.n_factors: int = check_int(n_factors, "n_factors", where, minimum=1)  # type: ignore[assignment]
        # std of the N(1, sigma^2) initialisation
        self.sigma: float = check_number(sigma, "sigma", where, minimum=0)  # type: ignore[assignment]
        self.relu = bool(relu)
        self.permute = bool(permute)
        self.seed = int(seed)
        self.size = max(self.in_features, self.out_features)
        kw = {"device": device, "dtype": dtype}
        shape = (self.n_factors, self.size)
        self.a = nn.Parameter(torch.empty(shape, **kw))
        self.d = nn.Parameter(torch.empty(shape, **kw))
        if bias:
            self.a_bias: nn.Parameter | None = nn.Parameter(torch.empty(shape, **kw))
            self.d_bias: nn.Parameter | None = nn.Parameter(torch.empty(shape, **kw))
        else:
            self.register_parameter("a_bias", None)
            self.register_parameter("d_bias", None)
        if self.permute and self.n_factors > 1:
            gen = torch.Generator().manual_seed(self.seed)
            perms = torch.stack([torch.randperm(self.size, generator=gen) for _ in range(self.n_factors - 1)])
            self.register_buffer("permutations", perms.to(device))
        else:
            self.register_buffer("permutations", None)
        self._prepared_key: tuple[Any, ...] | None = None
        self._prepared: tuple[Tensor, Tensor] | None = None
        self._export_dct: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``a, d ~ N(1, sigma^2)``, biases zero."""
        with torch.no_grad():
            nn.init.normal_(self.a, 1.0, self.sigma)
            nn.init.normal_(self.d, 1.0, self.sigma)
            if self.a_bias is not None and self.d_bias is not None:
                self.a_bias.zero_()
                self.d_bias.zero_()

    def _prepared_permutations(self) -> tuple[Tensor, Tensor] | None:
        perms = self.permutations
        if perms is None:
            return None
        key = (perms.device, perms.data_ptr(), perms._version)
        if self._prepared is None or key != self._prepared_key:
            self._prepared = prepare_permutations(perms)
            self._prepared_key = key
        return self._prepared

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected input (..., {self.in_features}), got {tuple(x.shape)}"
            )
        if self.in_features < self.size:
            x = F.pad(x, (0, self.size - self.in_features))
        y = self._apply_stack(x, self.a, self.d, self.a_bias, self.d_bias)
        if self.out_features < self.size:
            y = y[..., : self.out_features]
        return y

    def _apply_stack(
        self, x: Tensor, a: Tensor, d: Tensor, a_bias: Tensor | None, d_bias: Tensor | None
    ) -> Tensor:
        if is_tracing():  # plain ops a tracer can follow (see lightning_struct.ops.portable)
            return acdc_stack_portable(
                x, a, d, a_bias, d_bias, self.permutations, self.relu, dct_matrix=self._export_dct
            )
        return acdc_stack(
            x, a, d, a_bias, d_bias, self.permutations, self.relu, prepared=self._prepared_permutations()
        )

    @property
    def export_dct(self) -> str:
        """How a traced/exported graph computes the DCTs: ``"fft"`` (default) or ``"matmul"``."""
        return "fft" if self._export_dct is None else "matmul"

    @export_dct.setter
    def export_dct(self, value: str) -> None:
        if value not in ("fft", "matmul"):
            raise ValueError(f"{type(self).__name__}.export_dct={value!r}; allowed: 'fft', 'matmul'")
        if value == "fft":
            self._export_dct = None
        else:  # a plain attribute (not a buffer): it never enters the state dict
            self._export_dct = dct_matrix(self.size, dtype=self.a.dtype, device=self.a.device)

    def _require_linear(self, what: str) -> None:
        if self.relu and self.n_factors > 1:
            raise ValueError(
                f"{type(self).__name__}.{what}: the stack has ReLUs between its {self.n_factors} factors, so it is "
                "not a linear map; build it with relu=False (or n_factors=1) to get an equivalent dense matrix"
            )

    @torch.no_grad()
    def dense_matrix(self) -> Tensor:
        """The equivalent ``(out_features, in_features)`` weight (ReLU-free stacks only).

        ``self(x) == x @ self.dense_matrix().T + self.dense_bias()``.
        """
        self._require_linear("dense_matrix")
        m, _ = acdc_dense_matrix(self.a, self.d, None, None, self.permutations)
        return m[: self.out_features, : self.in_features]

    @torch.no_grad()
    def dense_bias(self) -> Tensor:
        """The equivalent ``(out_features,)`` bias (zeros without biases; ReLU-free stacks only)."""
        self._require_linear("dense_bias")
        if self.a_bias is None:
            return torch.zeros(self.out_features, dtype=self.a.dtype, device=self.a.device)
        zero = torch.zeros(1, self.in_features, dtype=self.a.dtype, device=self.a.device)
        return self(zero)[0]

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same map (ReLU-free stacks only)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.a_bias is not None,
            device=self.a.device,
            dtype=self.a.dtype,
        )
        lin.weight.copy_(self.dense_matrix())
        if lin.bias is not None:
            lin.bias.copy_(self.dense_bias())
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n_factors={self.n_factors}, "
            f"relu={self.relu}, permute={self.permute}, bias={self.a_bias is not None}, sigma={self.sigma}"
        )


class ACDC(ACDCStack):
    """One ACDC factor on ``features`` inputs: ``y = IDCT(d * DCT(a * x + a_bias) + d_bias)``.

    ``C`` = orthonormal DCT-II, so the map is ``x -> C^T diag(d) C diag(a) x + C^T(d * C a_bias) + C^T d_bias``
    (``2N`` parameters, ``4N`` with biases). Parameters ``a``, ``d``, ``a_bias``, ``d_bias``
    have shape ``(features,)``; init ``a, d ~ N(1, sigma^2)``, biases zero.

    Shapes: ``(..., features) -> (..., features)``.
    """

    def __init__(
        self,
        features: int,
        bias: bool = True,
        sigma: float = 0.01,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        size: int = check_int(features, "features", "ACDC", minimum=1)  # type: ignore[assignment]
        self.in_features = self.out_features = self.size = size
        self.n_factors = 1
        self.sigma = check_number(sigma, "sigma", "ACDC", minimum=0)  # type: ignore[assignment]
        self.relu = False
        self.permute = False
        self.seed = 0
        kw = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(features, **kw))
        self.d = nn.Parameter(torch.empty(features, **kw))
        if bias:
            self.a_bias = nn.Parameter(torch.empty(features, **kw))
            self.d_bias = nn.Parameter(torch.empty(features, **kw))
        else:
            self.register_parameter("a_bias", None)
            self.register_parameter("d_bias", None)
        self.register_buffer("permutations", None)
        self._prepared_key = None
        self._prepared = None
        self._export_dct = None
        self.reset_parameters()

    @property
    def features(self) -> int:
        return self.in_features

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"ACDC: expected input (..., {self.size}), got {tuple(x.shape)}")
        ab = self.a_bias[None] if self.a_bias is not None else None
        db = self.d_bias[None] if self.d_bias is not None else None
        return self._apply_stack(x, self.a[None], self.d[None], ab, db)

    @torch.no_grad()
    def dense_matrix(self) -> Tensor:
        """``C^T diag(d) C diag(a)`` as an ``(N, N)`` matrix; ``self(x) == x @ M.T + dense_bias()``."""
        m, _ = acdc_dense_matrix(self.a[None], self.d[None])
        return m

    def extra_repr(self) -> str:
        return f"features={self.size}, bias={self.a_bias is not None}, sigma={self.sigma}"


class ACDCConv1x1(nn.Module):
    """An :class:`ACDCStack` applied at every pixel: a structured ``1 x 1`` convolution.

    Equivalent to ``nn.Conv2d(in_channels, out_channels, 1, stride=stride)`` whose weight is the
    stack's (ReLU-free) matrix. The input is moved to channels-last, the stack runs on the
    ``(B*H*W, C)`` rows, and the result is moved back.

    Args:
        in_channels, out_channels: channel counts.
        stride: spatial stride (a strided ``1 x 1`` conv just subsamples).
        **stack_kwargs: forwarded to :class:`ACDCStack` (``n_factors``, ``relu``, ``permute``,
            ``sigma``, ``bias``, ``seed``, ``device``, ``dtype``).

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, **stack_kwargs: Any) -> None:
        super().__init__()
        where = "ACDCConv1x1"
        self.in_channels: int = check_int(in_channels, "in_channels", where, minimum=1)  # type: ignore[assignment]
        self.out_channels: int = check_int(out_channels, "out_channels", where, minimum=1)  # type: ignore[assignment]
        self.stride: int = check_int(stride, "stride", where, minimum=1)  # type: ignore[assignment]
        self.stack = ACDCStack(in_channels, out_channels, **stack_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ACDCConv1x1: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride].contiguous()
        return self.stack(x.movedim(1, -1)).movedim(-1, 1)

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` (kernel 1) computing the same map (ReLU-free stacks only)."""
        lin = self.stack.to_dense()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            1,
            stride=self.stride,
            bias=lin.bias is not None,
            device=lin.weight.device,
            dtype=lin.weight.dtype,
        )
        conv.weight.copy_(lin.weight[:, :, None, None])
        if conv.bias is not None and lin.bias is not None:
            conv.bias.copy_(lin.bias)
        return conv

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"
