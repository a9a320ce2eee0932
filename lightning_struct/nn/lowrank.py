"""Low-rank replacements for ``nn.Conv2d`` and ``nn.Linear`` that keep their factors.

* :class:`LowRankLinear`: ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.
* :class:`LowRankConv2d`: one of three conv factorizations (see :mod:`lightning_struct.ops.factorize`):

  ========== ================================================= ==========================
  scheme      layers (in order)                                  submodule names
  ========== ================================================= ==========================
  channel     ``kh x kw`` conv ``C -> g r``; ``1 x 1`` ``-> N``  ``first``, ``second``
  spatial     ``kh x 1`` conv ``C -> g K``; ``1 x kw`` ``-> N``  ``vertical``, ``horizontal``
  tucker2     ``1 x 1`` ``C -> g R_in``; ``kh x kw`` core;        ``first``, ``core``, ``last``
              ``1 x 1`` ``-> N``
  ========== ================================================= ==========================

Stride, padding (ints, pairs, ``"same"``/``"valid"``), padding mode, dilation and groups of the
dense conv are carried over so that a full-rank factorization computes the same function
(grouped convs are factorized per group, every factor is a grouped conv). The bias lives on
the last factor. ``from_dense`` builds the factors by SVD/HOSVD, ``to_dense`` folds them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_struct._checks import check_int, is_int
from lightning_struct.ops import factorize as fz

__all__ = ["LowRankConv2d", "LowRankLinear", "pick_rank"]


def _check_rule(rank: Any, energy: Any, ratio: Any) -> None:
    given = [n for n, v in (("rank", rank), ("energy", energy), ("ratio", ratio)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one rank rule; got {given}")


def pick_rank(
    spectrum: Tensor | tuple[Tensor, Tensor],
    full: int | tuple[int, int],
    *,
    rank: int | Sequence[int] | None = None,
    energy: float | None = None,
    ratio: float | None = None,
) -> int | tuple[int, int]:
    """Apply one rank rule to a layer's spectrum (full rank when no rule is given).

    Args:
        spectrum: ``(g, m)`` singular values, or ``(s_in, s_out)`` for Tucker-2.
        full: full rank (a pair ``(R_in, R_out)`` for Tucker-2).
        rank: absolute rank (int, or a pair for Tucker-2), clipped to the full rank.
        energy: fraction of squared singular values to keep (per unfolding for Tucker-2).
        ratio: fraction of the full rank (per unfolding for Tucker-2).
    """
    _check_rule(rank, energy, ratio)
    if isinstance(full, tuple):
        if rank is not None:
            ri, ro = fz.as_pair(rank, "rank", "pick_rank")  # type: ignore[misc]
            check_int(ri, "R_in", "pick_rank", minimum=1)
            check_int(ro, "R_out", "pick_rank", minimum=1)
            return (min(ri, full[0]), min(ro, full[1]))
        if energy is not None:
            s_in, s_out = spectrum  # type: ignore[misc]
            return (fz.energy_rank(s_in, energy), fz.energy_rank(s_out, energy))
        if ratio is not None:
            return (fz.ratio_rank(full[0], ratio), fz.ratio_rank(full[1], ratio))
        return full
    if rank is not None:
        check_int(rank, "rank", "pick_rank", minimum=1)
        return min(rank, full)  # type: ignore[type-var]
    if energy is not None:
        return fz.energy_rank(spectrum, energy)  # type: ignore[arg-type]
    if ratio is not None:
        return fz.ratio_rank(full, ratio)
    return full


class LowRankLinear(nn.Module):
    """``y = second(first(x))`` with ``first: in -> r`` (no bias) and ``second: r -> out``.

    Args:
        in_features: input size.
        out_features: output size.
        rank: inner size ``r >= 1``.
        bias: bias on ``second``.

    Shapes: input ``(*, in_features)`` -> output ``(*, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            check_int(v, name, "LowRankLinear", minimum=1)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_dense(
        cls,
        layer: nn.Linear,
        rank: int | None = None,
        *,
        energy: float | None = None,
        ratio: float | None = None,
    ) -> LowRankLinear:
        """Truncated SVD of a trained ``nn.Linear`` (full rank, i.e. exact, when no rule is given).

        Args:
            layer: the dense layer (its weight is read, not modified).
            rank: absolute rank (clipped to ``min(in, out)``).
            energy: keep this fraction of the squared singular values.
            ratio: keep this fraction of the full rank.
        """
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"LowRankLinear.from_dense expects an nn.Linear, got {type(layer).__name__}")
        w = layer.weight.detach()
        full = min(w.shape)
        s = fz.singular_values(w) if energy is not None else w.new_empty(0)
        r = int(pick_rank(s, full, rank=rank, energy=energy, ratio=ratio))  # type: ignore[arg-type]
        first, second = fz.linear_factors(w, r)
        out = cls(
            layer.in_features,
            layer.out_features,
            r,
            bias=layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            out.first.weight.copy_(first)
            out.second.weight.copy_(second)
            if layer.bias is not None:
                out.second.bias.copy_(layer.bias.detach())
        out.train(layer.training)
        return out

    def dense_weight(self) -> Tensor:
        """The equivalent ``(out, in)`` weight (autograd-connected to the factors)."""
        return fz.compose_linear(self.first.weight, self.second.weight)

    def to_dense(self) -> nn.Linear:
        """Fold the factors back into one ``nn.Linear`` computing the same function."""
        w = self.first.weight
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.second.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if self.second.bias is not None:
                out.bias.copy_(self.second.bias)
        out.train(self.training)
        return out

    def spec(self) -> dict[str, Any]:
        """Hyper-parameters that rebuild this module's structure (JSON-serialisable)."""
        return {
            "kind": "lowrank_linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.second.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankLinear:
        """Rebuild an (untrained) module from :meth:`spec`."""
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Module):
    """A factorized ``nn.Conv2d`` (see the module docstring for the three schemes).

    Args:
        in_channels: ``C``.
        out_channels: ``N``.
        kernel_size: ``k`` or ``(kh, kw)``.
        rank: per-group rank: ``r`` (channel), ``K`` (spatial), or ``(R_in, R_out)`` / one int for
            both (tucker2).
        scheme: ``"channel"``, ``"spatial"`` or ``"tucker2"``.
        stride, padding, dilation, groups, bias, padding_mode: as for ``nn.Conv2d``.

    Shapes: input ``(B, C, H, W)`` -> output ``(B, N, H', W')`` exactly as the dense conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        rank: int | Sequence[int],
        scheme: str = "channel",
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fz.check_scheme(scheme)
        where = "LowRankConv2d"
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            check_int(v, name, where, minimum=1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"LowRankConv2d: in_channels={in_channels} and out_channels={out_channels} must be divisible "
                f"by groups={groups}"
            )
        ks: tuple[int, int] = fz.as_pair(kernel_size, "kernel_size", where)  # type: ignore[assignment]
        st: tuple[int, int] = fz.as_pair(stride, "stride", where)  # type: ignore[assignment]
        dl: tuple[int, int] = fz.as_pair(dilation, "dilation", where)  # type: ignore[assignment]
        pd = fz.as_pair(padding, "padding", where, strings=("same", "valid"))
        rk: int | tuple[int, int]
        if scheme == "tucker2":
            rk = fz.as_pair(rank, "rank", where)  # type: ignore[assignment]
            for name, v in zip(("R_in", "R_out"), rk):  # type: ignore[arg-type]
                check_int(v, f"rank {name}", where, minimum=1)
        else:
            if not is_int(rank):
                raise ValueError(f"{where}: scheme={scheme!r} takes an int rank, got {rank!r}")
            rk = check_int(rank, "rank", where, minimum=1)  # type: ignore[assignment]
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation, self.padding = ks, st, dl, pd
        self.groups, self.padding_mode, self.scheme, self.rank = groups, padding_mode, scheme, rk
        g = groups
        kw_ = {"device": device, "dtype": dtype}
        if scheme == "channel":
            r = int(rk)  # type: ignore[arg-type]
            self.first = nn.Conv2d(
                in_channels, g * r, ks, st, pd, dl, groups=g, bias=False, padding_mode=padding_mode, **kw_
            )
            self.second = nn.Conv2d(g * r, out_channels, 1, groups=g, bias=bias, **kw_)
        elif scheme == "spatial":
            k = int(rk)  # type: ignore[arg-type]
            pv: tuple[int, int] | str = pd if isinstance(pd, str) else (pd[0], 0)
            ph: tuple[int, int] | str = pd if isinstance(pd, str) else (0, pd[1])
            self.vertical = nn.Conv2d(
                in_channels, g * k, (ks[0], 1), (st[0], 1), pv, (dl[0], 1), groups=g, bias=False,
                padding_mode=padding_mode, **kw_,
            )  # fmt: skip
            self.horizontal = nn.Conv2d(
                g * k, out_channels, (1, ks[1]), (1, st[1]), ph, (1, dl[1]), groups=g, bias=bias,
                padding_mode=padding_mode, **kw_,
            )  # fmt: skip
        else:
            ri, ro = rk  # type: ignore[misc]
            self.first = nn.Conv2d(in_channels, g * ri, 1, groups=g, bias=False, **kw_)
            self.core = nn.Conv2d(
                g * ri, g * ro, ks, st, pd, dl, groups=g, bias=False, padding_mode=padding_mode, **kw_
            )
            self.last = nn.Conv2d(g * ro, out_channels, 1, groups=g, bias=bias, **kw_)

    # -- structure ----------------------------------------------------------------------------
    @property
    def factors(self) -> list[nn.Conv2d]:
        """The factor convs in application order."""
        if self.scheme == "channel":
            return [self.first, self.second]
        if self.scheme == "spatial":
            return [self.vertical, self.horizontal]
        return [self.first, self.core, self.last]

    @property
    def bias(self) -> Tensor | None:
        """The bias (owned by the last factor)."""
        return self.factors[-1].bias

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.factors:
            x = conv(x)
        return x

    # -- conversion ---------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        layer: nn.Conv2d,
        rank: int | Sequence[int] | None = None,
        *,
        scheme: str = "channel",
        energy: float | None = None,
        ratio: float | None = None,
    ) -> LowRankConv2d:
        """Factorize a trained ``nn.Conv2d`` (full rank, i.e. exact, when no rule is given).

        Args:
            layer: the dense conv (read, not modified).
            rank: absolute rank per group (a pair ``(R_in, R_out)`` allowed for tucker2),
                clipped to the full rank.
            scheme: ``"channel"``, ``"spatial"`` or ``"tucker2"``.
            energy: keep this fraction of squared singular values (tucker2: of each unfolding).
            ratio: keep this fraction of the full rank.
        """
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"LowRankConv2d.from_dense expects an nn.Conv2d, got {type(layer).__name__}")
        fz.check_scheme(scheme)
        w = layer.weight.detach()
        g = layer.groups
        full = fz.conv_full_rank(w.shape, scheme, g)
        spec = fz.conv_spectrum(w, scheme, g) if energy is not None else w.new_empty(0)
        r = pick_rank(spec, full, rank=rank, energy=energy, ratio=ratio)
        out = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, r, scheme, layer.stride, layer.padding,
            layer.dilation, g, layer.bias is not None, layer.padding_mode, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        out.load_factors(w)
        if layer.bias is not None:
            with torch.no_grad():
                out.factors[-1].bias.copy_(layer.bias.detach())  # type: ignore[union-attr]
        out.train(layer.training)
        return out

    @torch.no_grad()
    def load_factors(self, w: Tensor) -> None:
        """Set the factor weights from a dense kernel ``(N, C/g, kh, kw)`` at this module's ranks."""
        expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if tuple(w.shape) != expected:
            raise ValueError(f"LowRankConv2d.load_factors: kernel shape {tuple(w.shape)} != {expected}")
        if self.scheme == "channel":
            tensors: tuple[Tensor, ...] = fz.channel_factors(w, int(self.rank), self.groups)  # type: ignore[arg-type]
        elif self.scheme == "spatial":
            tensors = fz.spatial_factors(w, int(self.rank), self.groups)  # type: ignore[arg-type]
        else:
            tensors = fz.tucker2_factors(w, self.rank, self.groups)  # type: ignore[arg-type]
        for conv, t in zip(self.factors, tensors):
            if conv.weight.shape != t.shape:
                full = fz.conv_full_rank(w.shape, self.scheme, self.groups)
                raise ValueError(
                    f"LowRankConv2d.load_factors: rank={self.rank} exceeds the full rank {full} of a "
                    f"{tuple(w.shape)} kernel (scheme={self.scheme!r}, groups={self.groups})"
                )
            conv.weight.copy_(t)

    def dense_weight(self) -> Tensor:
        """The equivalent dense kernel ``(N, C/g, kh, kw)`` (autograd-connected to the factors)."""
        g = self.groups
        if self.scheme == "channel":
            return fz.compose_channel(self.first.weight, self.second.weight, g)
        if self.scheme == "spatial":
            return fz.compose_spatial(self.vertical.weight, self.horizontal.weight, g)
        return fz.compose_tucker2(self.first.weight, self.core.weight, self.last.weight, g)

    def to_dense(self) -> nn.Conv2d:
        """Fold the factors back into one ``nn.Conv2d`` computing the same function."""
        w = self.factors[0].weight
        out = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)  # type: ignore[union-attr]
        out.train(self.training)
        return out

    def spec(self) -> dict[str, Any]:
        """Hyper-parameters that rebuild this module's structure (JSON-serialisable)."""
        return {
            "kind": "lowrank_conv2d",
            "scheme": self.scheme,
            "rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankConv2d:
        """Rebuild an (untrained) module from :meth:`spec`."""
        rank = spec["rank"]
        return cls(
            spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
            tuple(rank) if isinstance(rank, list) else rank, spec["scheme"], tuple(spec["stride"]),
            spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"]),
            tuple(spec["dilation"]), spec["groups"], spec["bias"], spec["padding_mode"],
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, scheme={self.scheme!r}, "
            f"rank={self.rank}, stride={self.stride}, padding={self.padding}, groups={self.groups}"
        )
