"""Row/column-space weight sharing (Koyun & Toreyin 2024): tied weights from dense ones.

A tied pair uses one matrix ``W`` (``r x C``) twice: ``W`` maps ``C -> r`` (the "reduce" role,
e.g. a bottleneck's first 1x1 conv or an FFN's first Linear) and ``W^T`` maps ``r -> C`` (the
"expand" role, the last 1x1 conv / second Linear). Converting a trained dense pair
``(R, E)`` (``R``: ``r x C``, ``E``: ``C x r``) needs one ``W`` close to both ``R`` and ``E^T``.

:func:`tied_weight_least_squares` solves, over one or several pairs ``(R_b, E_b)`` (several
pairs: "staged" sharing, one ``W`` for all identity-shaped blocks of a stage)::

    W* = argmin_W  sum_b ||c_b R_b - W||_F^2 + ||e_b E_b^T - W||_F^2
       = (1 / 2B) sum_b (c_b R_b + e_b E_b^T)

(the objective is a sum of squares in ``W``; setting its gradient ``2 sum_b (2W - c_b R_b -
e_b E_b^T)`` to zero gives the mean). The scalars ``c_b, e_b > 0`` depend on ``mode``:

* ``"average"``: ``c_b = e_b = 1``, the plain least-squares problem,
  ``W = (R + E^T) / 2`` for one pair. Right when the scale of each weight matters, e.g. an FFN
  ``W2 GELU(W1 x + b1) + b2`` (nothing normalises ``W1 x``).
* ``"balanced"``: ``c_b = sqrt(||E_b|| / ||R_b||)``, ``e_b = 1 / c_b``, so both rescaled weights
  get the same Frobenius norm ``sqrt(||R_b|| ||E_b||)`` before averaging. Right when each role is
  followed by a normalisation (a ResNet bottleneck: ``bn1`` after the reduce conv, ``bn3`` after
  the expand conv), which makes the block invariant to a positive rescaling of either weight:
  without balancing, the larger of the two would dominate the mean and the smaller role would
  be lost. The caller rescales the following normalisation statistics by ``c_b`` / ``e_b``
  (see :func:`lightning_struct.nn.tied.TiedBottleneck.from_bottleneck`) so that, when the pair
  is already tied up to scale, the converted block computes the same function in eval mode.

In both modes an already tied pair (``E = R^T``) gives ``W = R`` (exactly for ``"average"``;
up to rounding of the two norms for ``"balanced"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_struct._checks import check_choice

__all__ = ["TieMode", "as_matrix", "tie_scales", "tied_weight_least_squares"]

TieMode = Literal["average", "balanced"]
_MODES = ("average", "balanced")


def as_matrix(w: Tensor, name: str) -> Tensor:
    """View a Linear weight ``(out, in)`` or a 1x1 conv weight ``(out, in, 1, 1)`` as ``(out, in)``."""
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        return w[:, :, 0, 0]
    if w.ndim == 2:
        return w
    raise ValueError(f"{name}: expected a (out, in) or (out, in, 1, 1) weight, got shape {tuple(w.shape)}")


def tie_scales(reduce_weight: Tensor, expand_weight: Tensor, mode: TieMode) -> tuple[float, float]:
    """The scalars ``(c, e)`` of one pair for ``mode`` (see the module docstring)."""
    check_choice(mode, "mode", _MODES, "tie_scales")
    if mode == "average":
        return 1.0, 1.0
    nr = float(torch.linalg.vector_norm(reduce_weight.detach().double()))
    ne = float(torch.linalg.vector_norm(expand_weight.detach().double()))
    if nr == 0.0 or ne == 0.0:  # nothing to balance against: keep the weights as they are
        return 1.0, 1.0
    c = (ne / nr) ** 0.5
    return c, 1.0 / c


def tied_weight_least_squares(
    reduce_weights: Tensor | Sequence[Tensor],
    expand_weights: Tensor | Sequence[Tensor],
    mode: TieMode = "average",
) -> tuple[Tensor, list[tuple[float, float]]]:
    """Least-squares tied weight ``W`` for one or several dense (reduce, expand) pairs.

    Args:
        reduce_weights: ``R_b`` of shape ``(r, C)`` or ``(r, C, 1, 1)`` (one tensor or a list).
        expand_weights: ``E_b`` of shape ``(C, r)`` or ``(C, r, 1, 1)``, same count.
        mode: ``"average"`` or ``"balanced"`` (module docstring).

    Returns:
        ``(W, scales)``: ``W`` with the shape (and dtype/device) of the first reduce weight, and
        the per-pair scalars ``(c_b, e_b)`` that were applied to ``R_b`` and ``E_b``.
    """
    if isinstance(reduce_weights, Tensor):
        reduce_weights = [reduce_weights]
    if isinstance(expand_weights, Tensor):
        expand_weights = [expand_weights]
    if len(reduce_weights) != len(expand_weights) or not reduce_weights:
        raise ValueError(
            f"need the same positive number of reduce and expand weights, got {len(reduce_weights)} and "
            f"{len(expand_weights)}"
        )
    first = reduce_weights[0]
    r, c_in = as_matrix(first, "reduce_weights[0]").shape
    acc = torch.zeros(r, c_in, dtype=torch.float64, device=first.device)
    scales: list[tuple[float, float]] = []
    for i, (wr, we) in enumerate(zip(reduce_weights, expand_weights)):
        mr = as_matrix(wr, f"reduce_weights[{i}]").detach()
        me = as_matrix(we, f"expand_weights[{i}]").detach()
        if mr.shape != (r, c_in):
            raise ValueError(
                f"reduce_weights[{i}] has shape {tuple(mr.shape)[:2]}, expected {(r, c_in)} like the first"
            )
        if me.shape != (c_in, r):
            raise ValueError(
                f"expand_weights[{i}] has shape {tuple(me.shape)[:2]}; tying needs the transpose of the reduce "
                f"weight's shape, {(c_in, r)} (the expand must map the {r} hidden channels back to the {c_in} inputs)"
            )
        cs, es = tie_scales(mr, me, mode)
        scales.append((cs, es))
        acc += cs * mr.double() + es * me.double().T
    w = (acc / (2 * len(reduce_weights))).to(first.dtype)
    return w.reshape(first.shape), scales
