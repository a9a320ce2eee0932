"""The spectral norm of a convolution as PyTorch applies it: zero padding, on the real input size.

The LFA spectrum (:mod:`.full`) is that of the *periodic* operator. A conv with ``padding_mode=
"zeros"`` is a different matrix: the periodic operator on a grid large enough to hold the padded
input, restricted to the zero-embedded inputs and to the output window. So

    sigma_max(zero-padded on n) <= sup_theta ||A(theta)||     (the symbol's sup over all frequencies)

while the periodic ``n``-grid norm samples that sup on ``n`` frequencies per axis: the two can
differ either way by a few percent on small inputs, and the gap closes as ``n`` grows.

:func:`padded_conv_norm` computes the zero-padded operator norm itself by restarted Lanczos on
``A^T A`` with ``F.conv*d`` and its exact adjoint (autograd's vector-Jacobian product of the linear
map): no matrix is formed, each step costs two convolutions of one example, and a warm start
(the previous call's vector) converges in a few iterations when the weights moved little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["padded_conv_norm"]


def padded_conv_norm(
    weight: torch.Tensor,
    input_size: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    start: torch.Tensor | None = None,
    max_iter: int = 300,
    tol: float = 1e-6,
    krylov: int = 20,
    seed: int = 0,
) -> tuple[float, torch.Tensor, int]:
    """``sigma_max`` of ``x -> conv(x, weight, padding=padding, ...)`` on inputs of ``input_size``.

    Restarted Lanczos on ``A^T A`` (``krylov`` vectors per cycle) until the top Ritz pair's
    residual is below ``tol`` times its value, or after ``max_iter`` applications of ``A^T A``;
    in the weights' dtype.

    Returns:
        ``(sigma_max, v, applications of A^T A)``; ``v`` (the top right singular vector estimate, shape
        ``(1, C_in, *input_size)``) is the warm start of the next call.
    """
    d = weight.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    w = weight.detach()
    c_in = w.shape[1] * groups
    shape = (1, c_in, *[int(s) for s in input_size])
    if start is not None and tuple(start.shape) == shape:
        v = start.detach().to(w.dtype)
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(shape, generator=gen, dtype=w.dtype).to(w.device)
    v = v / v.norm()

    def ata(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = conv(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
            (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())  # A^T (A x)
        return g

    # restarted Lanczos on A^T A (full reorthogonalisation within a cycle): the top Ritz vector of
    # each cycle starts the next, until its residual ||A^T A y - theta y|| <= tol * theta
    theta, applied = 0.0, 0
    while applied < max_iter:
        basis = [v]
        alphas: list[float] = []
        betas: list[float] = []
        for _ in range(min(krylov, max_iter - applied)):
            u = ata(basis[-1])
            applied += 1
            alpha = float((u * basis[-1]).sum())
            alphas.append(alpha)
            for q in basis:  # full reorthogonalisation (twice is enough)
                u = u - (u * q).sum() * q
            for q in basis:
                u = u - (u * q).sum() * q
            beta = float(u.norm())
            if beta <= 1e-14 * max(abs(alpha), 1e-300):
                break
            betas.append(beta)
            basis.append(u / beta)
        m = len(alphas)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas[: m - 1], dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta = float(evals[-1])
        coef = evecs[:, -1].to(v.dtype).to(v.device)
        y = sum(c * q for c, q in zip(coef, basis[:m]))
        v = y / y.norm()
        if theta <= 0.0:
            return 0.0, v, applied
        resid = float((ata(v) - theta * v).norm())
        applied += 1
        if resid <= tol * theta:
            break
    return theta**0.5, v, applied
