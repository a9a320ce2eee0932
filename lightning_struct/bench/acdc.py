"""``lightning-struct bench acdc``: ACDC stack vs dense ``nn.Linear`` vs a torch-dct ACDC.

The case: ``N = 4096`` features, batch 128, ``K = 12`` factors with ReLU and fixed
random permutations between them (Moczulski et al.'s CaffeNet layer), float32. Each timed call
is one forward plus one backward pass (gradients for the input and every parameter, through
``torch.autograd.grad`` with a fixed output gradient, so nothing accumulates).

* ours: :class:`lightning_struct.nn.ACDCStack` (fused packed-DCT forward/backward, one real FFT
  per transform, permutations fused with Makhoul's reordering);
* ``nn.Linear(4096, 4096)``: the dense layer it replaces;
* torch-dct: the same stack written with ``torch_dct.dct(x, norm="ortho")`` /
  ``torch_dct.idct`` and plain autograd (permutations by ``torch.gather``, like ours).

Timing: after one warm-up call each, ``rounds`` interleaved rounds (ours, dense, torch-dct)
each take the median of ``repeats`` calls; a method's time is its best round median, so a
burst of load from other processes hits all three alike and is filtered out.

The main rows use ``bias=False`` (the paper's ``2N`` parameters per factor); ``*_bias`` rows
add the two bias vectors per factor (``4N``). Parameter counts and their ratio to the dense
layer are printed and stored in each row's ``extra``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_struct.bench._harness import Row, median_time
from lightning_struct.nn.acdc import ACDCStack

TITLE = "ACDC stack (fwd+bwd) vs dense nn.Linear vs torch-dct ACDC"


class TorchDctACDCStack(nn.Module):
    """Baseline: the same ACDC stack built on the ``torch-dct`` package and plain autograd."""

    def __init__(self, ours: ACDCStack) -> None:
        super().__init__()
        import torch_dct  # noqa: F401  (fail early with a clear ImportError)

        self.a = nn.Parameter(ours.a.detach().clone())
        self.d = nn.Parameter(ours.d.detach().clone())
        self.a_bias = nn.Parameter(ours.a_bias.detach().clone()) if ours.a_bias is not None else None
        self.d_bias = nn.Parameter(ours.d_bias.detach().clone()) if ours.d_bias is not None else None
        self.register_buffer(
            "permutations", ours.permutations.clone() if ours.permutations is not None else None
        )
        self.relu = ours.relu

    def forward(self, x: Tensor) -> Tensor:
        import torch_dct

        k_total = self.a.shape[0]
        for k in range(k_total):
            h = x * self.a[k]
            if self.a_bias is not None:
                h = h + self.a_bias[k]
            y = torch_dct.dct(h, norm="ortho") * self.d[k]
            if self.d_bias is not None:
                y = y + self.d_bias[k]
            x = torch_dct.idct(y, norm="ortho")
            if k < k_total - 1:
                if self.relu:
                    x = torch.relu(x)
                if self.permutations is not None:
                    x = torch.gather(x, -1, self.permutations[k].expand_as(x))
        return x


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _step(module: nn.Module, x: Tensor, grad_out: Tensor) -> Callable[[], None]:
    inputs = [x, *module.parameters()]

    def fn() -> None:
        out = module(x)
        torch.autograd.grad(out, inputs, grad_out)

    return fn


def _case(n: int, batch: int, k: int, bias: bool, repeats: int, rounds: int, device: str) -> list[Row]:
    torch.manual_seed(0)
    ours = ACDCStack(n, n_factors=k, relu=True, permute=True, bias=bias, device=device)
    dense = nn.Linear(n, n, device=device)
    base = TorchDctACDCStack(ours)
    x = torch.randn(batch, n, device=device, requires_grad=True)
    g = torch.randn(batch, n, device=device)
    with torch.no_grad():  # the baseline computes the same function
        err = (ours(x) - base(x)).abs().max().item()
    if not err < 1e-3:
        raise RuntimeError(f"torch-dct baseline disagrees with ACDCStack (max abs diff {err:.3g})")
    p_ours, p_dense = _n_params(ours), _n_params(dense)
    extra = {
        "params_ours": p_ours,
        "params_dense": p_dense,
        "param_ratio": round(p_dense / p_ours, 1),
        "N": n,
        "batch": batch,
        "K": k,
        "bias": bias,
    }
    tag = f"N={n} B={batch} K={k}{' bias' if bias else ''}"
    print(
        f"  {tag}: parameters ours {p_ours:,} vs dense {p_dense:,} -> {p_dense / p_ours:.1f}x fewer",
        flush=True,
    )
    fns = {"ours": _step(ours, x, g), "dense": _step(dense, x, g), "torch-dct": _step(base, x, g)}
    for fn in fns.values():  # warm-up (allocator, FFT plans)
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):  # interleaved rounds: the best round median of each, same treatment for all
        for name, fn in fns.items():
            best[name] = min(best[name], median_time(fn, repeats=repeats, warmup=0, device=device))
    t_ours, t_dense, t_base = best["ours"], best["dense"], best["torch-dct"]
    return [
        Row(f"acdc fwd+bwd {tag}", t_ours, "nn.Linear", t_dense, dict(extra)),
        Row(f"acdc fwd+bwd {tag}", t_ours, "torch-dct ACDC", t_base, dict(extra)),
    ]


def _forward(module: nn.Module, x: Tensor) -> Callable[[], None]:
    def fn() -> None:
        with torch.no_grad():
            module(x)

    return fn


def _structured_rows(n: int, batch: int, repeats: int, rounds: int, device: str) -> list[Row]:
    """ACDC against Monarch (Dao et al. 2022) and a butterfly product at equal parameter counts.

    All linear maps without biases (ACDC with permutations, no ReLU): ACDC with ``log2 n``
    factors has the butterfly's ``2 n log2 n`` parameters, ACDC with ``sqrt n`` factors the
    square Monarch's ``2 n sqrt n``. Forward alone (``no_grad``) and forward + backward, timed as
    :func:`_case` times its rows. ``extra["acdc_factors_at_equal_latency"]``: how many ACDC
    factors run in the Monarch's time (ACDC's cost is linear in the factors).
    """
    from lightning_struct.nn import ButterflyLinear, MonarchLinear

    torch.manual_seed(0)
    k_log, k_sqrt = int(math.log2(n)), math.isqrt(n)
    mods: dict[str, nn.Module] = {
        f"acdc K={k_log}": ACDCStack(n, n_factors=k_log, relu=False, permute=True, bias=False, device=device),
        f"acdc K={k_sqrt}": ACDCStack(n, n_factors=k_sqrt, relu=False, permute=True, bias=False, device=device),
        "butterfly": ButterflyLinear(n, bias=False, device=device),
        "monarch": MonarchLinear(n, bias=False, device=device),
        "nn.Linear": nn.Linear(n, n, bias=False, device=device),
    }
    params = {k: _n_params(m) for k, m in mods.items()}
    x = torch.randn(batch, n, device=device, requires_grad=True)
    g = torch.randn(batch, n, device=device)
    rows = []
    for mode, make in (("fwd", lambda m: _forward(m, x)), ("fwd+bwd", lambda m: _step(m, x, g))):
        fns = {k: make(m) for k, m in mods.items()}
        for fn in fns.values():
            fn()
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(rounds):
            for name, fn in fns.items():
                best[name] = min(best[name], median_time(fn, repeats=repeats, warmup=0, device=device))
        tag = f"N={n} B={batch} {mode}"
        equal = k_log * best["monarch"] / best[f"acdc K={k_log}"]
        for ours, base in ((f"acdc K={k_log}", "butterfly"), (f"acdc K={k_sqrt}", "monarch"), (f"acdc K={k_log}", "monarch"), (f"acdc K={k_log}", "nn.Linear")):
            extra = {"params_ours": params[ours], "params_baseline": params[base], "N": n, "batch": batch, "mode": mode}
            if base == "monarch":
                extra["acdc_factors_at_equal_latency"] = round(equal, 1)
            rows.append(Row(f"{ours} {tag}", best[ours], f"{base} ({params[base]:,} params)", best[base], extra))
    return rows


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    """Rows for N = 4096, batch 128, K = 12 (without and with biases), then ACDC vs Monarch /
    butterfly at N = 1024 and 4096, batch 1, 16, 128 (``--quick``: N = 1024 only); more repeats
    unless ``quick``."""
    repeats, rounds = (3, 2) if quick else (5, 4)
    rows = _case(4096, 128, 12, bias=False, repeats=repeats, rounds=rounds, device=device)
    rows += _case(4096, 128, 12, bias=True, repeats=repeats, rounds=rounds, device=device)
    for n in (1024,) if quick else (1024, 4096):
        for batch in (1, 16, 128):
            rows += _structured_rows(n, batch, repeats, rounds, device)
    return rows
