"""Row/column-space weight sharing blocks (Koyun & Toreyin 2024, "PE" models).

One matrix ``W`` is used to project into a narrow space and, transposed, to come back:

* :class:`TiedBottleneck` - a torchvision ResNet ``Bottleneck`` whose last 1x1 conv (expand,
  ``r -> C``) reuses the transposed weight of its first 1x1 conv (reduce, ``C -> r``)::

      out = relu(bn3(conv1x1(G(conv1x1(x, W)), W^T)) + shortcut(x)),
      G(h) = relu(bn2(conv3x3(relu(bn1(h)))))          # the unshared middle

  ``W`` has shape ``(r, C, 1, 1)`` (it *is* ``conv1.weight``); the expand applies
  ``W.transpose(0, 1)`` of shape ``(C, r, 1, 1)``. All three BNs are kept, as in torchvision.
  Tying needs the expand to map back onto the block's input width (``C_out == C_in``): the
  first block of every ResNet stage changes the width (and has a projection shortcut), so it
  cannot be tied and raises ``ValueError``. Staged sharing: several blocks of one stage pass
  the same ``shared_weight`` (one ``W`` per stage, each block keeps its own ``G`` and BNs).
* :class:`TiedMLP` - a transformer FFN ``W^T F(W x + b1) + b2`` (``W``: ``(mlp_dim, d)``,
  ``F`` = GELU, dropout as in torchvision's ``MLPBlock``): a drop-in for ViT's ``MLPBlock``.

Both offer constructors from trained dense blocks (``from_bottleneck``, ``from_bottlenecks``,
``from_mlp``) that initialise ``W`` by least squares (:mod:`lightning_struct.ops.tied`).
Parameter savings: ``r * C`` per tied bottleneck (the expand conv), ``mlp_dim * d`` per tied
FFN (the second Linear's weight; both biases are kept).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_struct._checks import check_int, check_number
from lightning_struct.ops.tied import TieMode, as_matrix, tied_weight_least_squares

__all__ = ["TiedBottleneck", "TiedMLP", "check_tieable_bottleneck"]


def _conv1x1_ok(conv: Any, name: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    if (
        conv.kernel_size != (1, 1)
        or conv.stride != (1, 1)
        or conv.padding not in ((0, 0), "valid")
        or conv.groups != 1
    ):
        raise ValueError(
            f"{name} must be a plain 1x1 conv (kernel 1, stride 1, padding 0, groups 1) to be tied; got "
            f"kernel={conv.kernel_size}, stride={conv.stride}, padding={conv.padding}, groups={conv.groups}"
        )
    if conv.bias is not None:
        raise ValueError(
            f"{name} has a bias; tied bottlenecks have bias-free 1x1 convs (the BN after it has one)"
        )


def check_tieable_bottleneck(block: nn.Module) -> None:
    """Raise ``ValueError`` explaining why ``block`` (a torchvision-style Bottleneck) cannot be tied."""
    for attr in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
        if not hasattr(block, attr):
            raise ValueError(f"{type(block).__name__} has no {attr!r}: not a torchvision-style Bottleneck")
    _conv1x1_ok(block.conv1, "conv1 (reduce)")
    _conv1x1_ok(block.conv3, "conv3 (expand)")
    c_in, width = block.conv1.in_channels, block.conv1.out_channels
    if block.conv3.out_channels != c_in or block.conv3.in_channels != width:
        raise ValueError(
            f"cannot tie: conv1 maps {c_in} -> {width} channels, so W^T maps {width} -> {c_in}, but conv3 maps "
            f"{block.conv3.in_channels} -> {block.conv3.out_channels}. This is a downsampling/projection block "
            "(C_in != C_out); it stays dense"
        )


class TiedBottleneck(nn.Module):
    """ResNet bottleneck with the expand 1x1 conv tied to the transposed reduce 1x1 conv.

    Args (as torchvision's ``Bottleneck``, whose layer names it keeps, minus ``conv3``):
        inplanes: input channels ``C``; must equal ``planes * 4`` (the output channels).
        planes: the block's ``planes``; the hidden width is ``r = int(planes * base_width / 64) * groups``.
        stride: stride of the 3x3 conv; ``stride > 1`` needs a ``downsample`` shortcut.
        downsample: shortcut module or ``None`` (identity).
        groups, base_width, dilation, norm_layer: as in torchvision.
        shared_weight: an ``nn.Parameter`` of shape ``(r, C, 1, 1)`` to use as ``W`` (staged
            sharing); ``None`` creates a new one.
        zero_init_residual: initialise ``bn3.weight`` at zero (torchvision's option).

    Init (fresh weights): ``W`` Kaiming-normal with the *fan-in of the reduce conv* (``C``),
    since ``W`` receives gradients from both of its roles; the 3x3 conv Kaiming-normal
    (fan-out, as torchvision); BNs at (1, 0).

    Shapes: ``(B, C, H, W) -> (B, C, H/stride, W/stride)``.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        shared_weight: nn.Parameter | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if inplanes != planes * self.expansion:
            raise ValueError(
                f"TiedBottleneck: cannot tie a block with inplanes={inplanes} != planes*{self.expansion}="
                f"{planes * self.expansion} (W^T would map back to {inplanes} channels, not {planes * self.expansion}); "
                "downsampling/projection blocks stay dense"
            )
        if stride != 1 and downsample is None:
            raise ValueError(f"TiedBottleneck: stride={stride} needs a downsample shortcut module")
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
        )
        self.bn2 = norm_layer(width)
        self.bn3 = norm_layer(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_in", nonlinearity="relu")
        nn.init.kaiming_normal_(self.conv2.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual and getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)
        if shared_weight is not None:
            self.share_weight(shared_weight)

    # ------------------------------------------------------------------ weights
    @property
    def weight(self) -> nn.Parameter:
        """``W``, shape ``(r, C, 1, 1)``: the reduce conv's weight, used transposed by the expand."""
        return self.conv1.weight

    def share_weight(self, weight: nn.Parameter) -> None:
        """Use ``weight`` (shape ``(r, C, 1, 1)``) as ``W`` (staged sharing across blocks)."""
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"shared_weight must be an nn.Parameter, got {type(weight).__name__}")
        if weight.shape != self.conv1.weight.shape:
            raise ValueError(
                f"shared_weight has shape {tuple(weight.shape)}, this block needs {tuple(self.conv1.weight.shape)}"
            )
        self.conv1.weight = weight

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(F.conv2d(out, self.conv1.weight.transpose(0, 1)))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def _from_parts(cls, block: nn.Module, weight: Tensor | nn.Parameter) -> TiedBottleneck:
        """A tied block holding deep copies of ``block``'s BNs, 3x3 conv, shortcut, with ``W = weight``."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        c_in, width = block.conv1.in_channels, block.conv1.out_channels
        w = block.conv1.weight
        new.conv1 = nn.Conv2d(c_in, width, 1, bias=False, device=w.device, dtype=w.dtype)
        if isinstance(weight, nn.Parameter):
            new.conv1.weight = weight
        else:
            with torch.no_grad():
                new.conv1.weight.copy_(weight)
        new.bn1 = copy.deepcopy(block.bn1)
        new.conv2 = copy.deepcopy(block.conv2)
        new.bn2 = copy.deepcopy(block.bn2)
        new.bn3 = copy.deepcopy(block.bn3)
        new.relu = copy.deepcopy(getattr(block, "relu", nn.ReLU(inplace=True)))
        new.downsample = copy.deepcopy(getattr(block, "downsample", None))
        new.stride = getattr(block, "stride", block.conv2.stride[0])
        new.train(block.training)
        return new

    @staticmethod
    @torch.no_grad()
    def _rescale_norm(norm: nn.Module, scale: float) -> None:
        """Make ``norm(scale * h)`` equal the old ``norm(h)`` in eval mode (BatchNorm running stats)."""
        if scale == 1.0:
            return
        mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
        if mean is not None and var is not None:
            mean.mul_(scale)
            var.add_(norm.eps).mul_(scale * scale).sub_(norm.eps)  # (var+eps)*s^2 - eps: exact in eval

    @classmethod
    def from_bottleneck(cls, block: nn.Module, mode: TieMode = "balanced") -> TiedBottleneck:
        """Tie a trained (torchvision-style) ``Bottleneck``: ``W`` by least squares from conv1 and conv3.

        ``W = (c R + e E^T) / 2`` with ``R = conv1.weight``, ``E = conv3.weight`` (see
        :mod:`lightning_struct.ops.tied`). ``mode="balanced"`` (default) first rescales both to
        the same norm (``c = sqrt(||E||/||R||)``, ``e = 1/c``) and rescales the running
        statistics of ``bn1`` by ``c`` and of ``bn3`` by ``e``, which leaves the dense block's
        eval-mode function unchanged, so the only approximation is ``R c ~ E^T e``; when the
        block was already tied (up to scale) the result is exact. ``mode="average"`` is the
        plain ``(R + E^T) / 2``. BNs, the 3x3 conv and the shortcut are deep-copied.

        Raises:
            ValueError: when the shapes do not allow tying (downsampling/projection blocks,
                strided / grouped / biased 1x1 convs).
        """
        check_tieable_bottleneck(block)
        w, [(c, e)] = tied_weight_least_squares(block.conv1.weight, block.conv3.weight, mode)
        new = cls._from_parts(block, w)
        cls._rescale_norm(new.bn1, c)
        cls._rescale_norm(new.bn3, e)
        return new

    @classmethod
    def from_bottlenecks(
        cls, blocks: Sequence[nn.Module], mode: TieMode = "balanced"
    ) -> list[TiedBottleneck]:
        """Staged sharing from trained blocks: one least-squares ``W`` for all ``blocks``.

        ``W = (1/2B) sum_b (c_b R_b + e_b E_b^T)``; every returned block holds the same
        ``nn.Parameter`` (counted once by ``parameters()``); BN statistics rescaled per block as
        in :meth:`from_bottleneck`.
        """
        if not blocks:
            raise ValueError("from_bottlenecks: got no blocks")
        for i, b in enumerate(blocks):
            try:
                check_tieable_bottleneck(b)
            except ValueError as err:
                raise ValueError(f"from_bottlenecks: block {i}: {err}") from err
        w, scales = tied_weight_least_squares(
            [b.conv1.weight for b in blocks], [b.conv3.weight for b in blocks], mode
        )
        shared = nn.Parameter(w.clone())
        out = []
        for b, (c, e) in zip(blocks, scales):
            new = cls._from_parts(b, shared)
            cls._rescale_norm(new.bn1, c)
            cls._rescale_norm(new.bn3, e)
            out.append(new)
        return out

    def extra_repr(self) -> str:
        r, c = self.conv1.weight.shape[:2]
        return f"tied: W {r}x{c} (reduce), W^T {c}x{r} (expand)"


class TiedMLP(nn.Module):
    """Transformer FFN with row/column-space sharing: ``W^T F(W x + b1) + b2``.

    Mirrors torchvision's ViT ``MLPBlock`` (``Linear, GELU, Dropout, Linear, Dropout``) with the
    second Linear's weight replaced by the transpose of the first.

    Args:
        in_dim: token width ``d``.
        mlp_dim: hidden width ``h``; ``W`` has shape ``(h, d)``.
        dropout: dropout probability (after ``F`` and after the output, as torchvision).
        activation: activation module class (default ``nn.GELU``) or instance.
        bias: learn ``b1`` (``(h,)``) and ``b2`` (``(d,)``).
        shared_weight: an ``nn.Parameter`` ``(h, d)`` to use as ``W``.

    Init: ``W`` Xavier-uniform, biases ``N(0, 1e-6)`` (torchvision's ``MLPBlock`` init).

    Shapes: ``(..., d) -> (..., d)``.
    """

    def __init__(
        self,
        in_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        activation: type[nn.Module] | nn.Module = nn.GELU,
        bias: bool = True,
        *,
        shared_weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("mlp_dim", mlp_dim)):
            check_int(v, name, "TiedMLP", minimum=1)
        check_number(dropout, "dropout", "TiedMLP", minimum=0, maximum=1, open_max=True)
        self.in_dim, self.mlp_dim = in_dim, mlp_dim
        self.weight = nn.Parameter(torch.empty(mlp_dim, in_dim))
        if bias:
            self.bias1: nn.Parameter | None = nn.Parameter(torch.empty(mlp_dim))
            self.bias2: nn.Parameter | None = nn.Parameter(torch.empty(in_dim))
        else:
            self.register_parameter("bias1", None)
            self.register_parameter("bias2", None)
        self.act = activation() if isinstance(activation, type) else activation
        self.dropout = nn.Dropout(float(dropout))
        nn.init.xavier_uniform_(self.weight)
        if self.bias1 is not None and self.bias2 is not None:
            nn.init.normal_(self.bias1, std=1e-6)
            nn.init.normal_(self.bias2, std=1e-6)
        if shared_weight is not None:
            if shared_weight.shape != self.weight.shape:
                raise ValueError(
                    f"shared_weight has shape {tuple(shared_weight.shape)}, need {tuple(self.weight.shape)}"
                )
            self.weight = shared_weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(self.act(F.linear(x, self.weight, self.bias1)))
        return self.dropout(F.linear(h, self.weight.t(), self.bias2))

    @classmethod
    def from_mlp(cls, block: nn.Module, mode: TieMode = "average") -> TiedMLP:
        """Tie a trained FFN (torchvision ``MLPBlock`` or any module with exactly two ``nn.Linear``).

        ``W = (W1 + W2^T) / 2`` (``mode="average"``, the least-squares tie; nothing normalises
        ``W1 x`` in an FFN, so the scales must be kept), ``b1``/``b2`` copied from the two
        Linears; the activation module and the dropout probability are copied from the block.

        Raises:
            ValueError: unless the block has exactly two Linears shaped ``(h, d)`` and ``(d, h)``
                with matching bias presence.
        """
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        if len(linears) != 2:
            raise ValueError(
                f"from_mlp: expected exactly two nn.Linear in {type(block).__name__}, found {len(linears)}"
            )
        fc1, fc2 = linears
        h, d = fc1.weight.shape
        if fc2.weight.shape != (d, h):
            raise ValueError(
                f"from_mlp: cannot tie Linear({d}->{h}) with Linear({fc2.in_features}->{fc2.out_features}); the second "
                f"must map {h} -> {d}"
            )
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("from_mlp: the two Linears must both have a bias or both not")
        skip = (nn.Linear, nn.Dropout, nn.Sequential, type(block))
        acts = [m for m in block.modules() if not isinstance(m, skip) and m is not block]
        drops = [m for m in block.modules() if isinstance(m, nn.Dropout)]
        act = copy.deepcopy(acts[0]) if acts else nn.Identity()
        new = cls(d, h, dropout=drops[0].p if drops else 0.0, activation=act, bias=fc1.bias is not None)
        w, _ = tied_weight_least_squares(fc1.weight, fc2.weight, mode)
        new = new.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(as_matrix(w, "W"))
            if new.bias1 is not None and fc1.bias is not None and fc2.bias is not None:
                new.bias1.copy_(fc1.bias)
                new.bias2.copy_(fc2.bias)
        new.train(block.training)
        return new

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, mlp_dim={self.mlp_dim}, tied: W {self.mlp_dim}x{self.in_dim} and W^T"
