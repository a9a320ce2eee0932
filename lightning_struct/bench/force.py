"""``lightning-struct bench force``: what ForceRegularization adds to a training step.

Setup: torchvision ResNet-50 (``weights=None``), SGD with momentum, cross-entropy on random
data, batch 8 at 224x224 (``--quick``: batch 2 at 112x112, same layers), float32 on the chosen
device. The default selection regularizes 52 layers (every conv and Linear except ``conv1`` and
``fc``; about 23.4 M weights).

What is measured, in one process, interleaved round by round so that drifting machine load
hits every variant alike:

* ``baseline``: one manual training step: ``zero_grad``, forward, loss, backward,
  ``optimizer.step()``;
* ``ours``: the same step with ``ForceRegularization.on_before_optimizer_step`` called between
  backward and ``optimizer.step()``, which is exactly where Lightning calls it (monitoring off:
  ``log_every_n_steps=None``);
* per variant also the hook alone (median of repeated calls on the same gradients), which is
  the cost the callback adds, free of the step-to-step noise of the full step;
* the memory limit of the L2 hook: one ``torch._foreach_add_`` over the same weights and
  gradients (read both, write the gradient: 3 passes over 23.4 M floats). The L2 force needs
  at least that (in fact two dependent reads of the weights: the filter norms and
  ``s = sum_j n_j`` before ``n_i . s``); ``hook/limit`` is the row's figure (target 2);
* the compute limit of the exact L1 hook: its two batched matmuls alone (the Gram ``W W^T``
  and the force ``P W``) on the same filter matrices, with their GFLOP.

The ratio column is ``baseline_s / ours_s`` (< 1: the force costs time); the added time is
``1/ratio - 1``. The force's cost does not depend on the batch: L2 is ``O(N D)`` per layer
(memory bound, a few passes over the weights), L1 is ``O(N^2 D)`` (two matmuls per layer, about
40 GFLOP for ResNet-50), so its share shrinks as the batch grows and ``--quick``'s small step
overstates it. ``every_n_steps=k`` ("lazy" application with ``k`` times the strength) divides
the amortized cost by ``k``; that row is derived from the measured hook time. The monitoring
(ranks by eigenvalues of each layer's Gram matrix, every ``log_every_n_steps``) is timed once
and reported in ``extra``.
"""

from __future__ import annotations

import statistics
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lightning_struct.bench._harness import Row, median_time

TITLE = "ResNet-50 training step with vs without ForceRegularization (ours = with force)"


def _setup(
    batch: int, size: int, device: str
) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    return model, opt, x, y


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    from lightning_struct.callbacks.force import ForceRegularization

    batch, size, rounds = (2, 112, 3) if quick else (8, 224, 5)
    model, opt, x, y = _setup(batch, size, device)
    trainer: Any = SimpleNamespace(is_global_zero=True)  # the hook only asks this when monitoring
    callbacks = {kind: ForceRegularization(1e-4, kind=kind, log_every_n_steps=None) for kind in ("l2", "l1")}
    for cb in callbacks.values():
        cb.layers = cb.select(model)
    n_weights = sum(layer.module.weight.numel() for layer in callbacks["l2"].layers)

    def step(cb: ForceRegularization | None) -> None:
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        if cb is not None:
            cb.on_before_optimizer_step(trainer, model, opt)  # type: ignore[arg-type]
        opt.step()

    variants: dict[str, ForceRegularization | None] = {"baseline": None, **callbacks}
    for cb in variants.values():  # warm-up: allocator, oneDNN primitives, first-touch
        step(cb)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, cb in variants.items():
            times[name].append(median_time(lambda cb=cb: step(cb), repeats=1, warmup=0, device=device))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    # the hook alone, on the gradients of the last step
    hook_s = {
        kind: median_time(
            lambda cb=cb: cb.on_before_optimizer_step(trainer, model, opt),  # type: ignore[arg-type]
            repeats=3 if quick else 7,
            warmup=1,
            device=device,
        )
        for kind, cb in callbacks.items()
    }
    # the memory limit of the L2 hook: one fused multi-tensor pass over the same weights and
    # gradients (grad += alpha * weight: read both, write the gradient), what no force can beat
    weights = [layer.module.weight for layer in callbacks["l2"].layers]
    grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
    limit_s = median_time(lambda: torch._foreach_add_(grads, weights, alpha=1e-30), repeats=3 if quick else 7, warmup=1, device=device)
    # the compute limit of the exact L1 hook: its two batched matmuls alone (the Gram W W^T and
    # the force P W) on the same filter matrices, and their floating-point work
    mats = [w.detach().reshape(layer.groups, w.shape[0] // layer.groups, -1) for layer, w in zip(callbacks["l1"].layers, weights)]
    squares = [torch.zeros(m.shape[0], m.shape[1], m.shape[1], device=device) for m in mats]

    def l1_matmuls() -> None:
        for m, sq in zip(mats, squares):
            torch.bmm(m, m.mT, out=sq)
            torch.bmm(sq, m)

    l1_limit_s = median_time(l1_matmuls, repeats=3 if quick else 7, warmup=1, device=device)
    l1_gflop = sum(2 * 2 * m.shape[0] * m.shape[1] ** 2 * m.shape[2] for m in mats) / 1e9
    # one monitoring call (ranks at 0.95, cosines, ratios of all layers)
    mon = ForceRegularization(1e-4, log_every_n_steps=1)
    mon.layers = mon.select(model)
    mon._log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # time the metrics, not the loggers
    monitor_s = median_time(
        lambda: mon.on_before_optimizer_step(trainer, model, opt), repeats=1, warmup=0, device=device
    )  # type: ignore[arg-type]

    case = f"resnet50 b{batch} {size}px {device}"
    base = med["baseline"]
    rows: list[Row] = []
    for kind in ("l2", "l1"):
        ours = med[kind]
        extra = {
            "added_pct": 100.0 * (ours / base - 1.0),
            "hook_s": hook_s[kind],
            "hook_pct_of_step": 100.0 * hook_s[kind] / base,
            "layers": len(callbacks[kind].layers),
            "weights": n_weights,
            "rounds": rounds,
        }
        if kind == "l2":
            extra["monitor_s_per_call"] = monitor_s
        rows.append(Row(f"{case} force {kind.upper()}", ours, "step without force", base, extra))
    rows.append(
        Row(
            f"{case} force L2 hook alone", hook_s["l2"], "limit: one foreach pass over weights + grads", limit_s,
            {"hook/limit": hook_s["l2"] / limit_s, "target_hook/limit": 2.0, "bytes_moved_by_limit": 3 * 4 * n_weights},
        )  # fmt: skip
    )
    rows.append(
        Row(
            f"{case} force L1 hook alone", hook_s["l1"], "limit: its two matmuls alone (W W^T, P W)", l1_limit_s,
            {"hook/limit": hook_s["l1"] / l1_limit_s, "gflop": l1_gflop, "gflop_per_s_of_limit": l1_gflop / l1_limit_s},
        )  # fmt: skip
    )
    lazy = 8
    rows.append(
        Row(
            f"{case} force L1 every {lazy} steps (derived)",
            base + hook_s["l1"] / lazy,
            "step without force",
            base,
            {"added_pct": 100.0 * hook_s["l1"] / lazy / base, "derived_from": "baseline_s + hook_s(L1) / 8"},
        )
    )
    for r in rows:
        if "added_pct" not in r.extra:
            print(f"{r.case}: {r.ours_s * 1e3:.2f} ms vs the limit {r.baseline_s * 1e3:.2f} ms ({r.extra['hook/limit']:.2f}x)", flush=True)
            continue
        pct = r.extra["added_pct"]
        hook = r.extra.get("hook_pct_of_step")
        note = f"; hook alone {hook:.2f}% of the step" if hook is not None else ""
        print(f"{r.case}: added time {pct:+.2f}%{note}", flush=True)
    print(
        f"monitoring (ranks/cosines/ratios of {len(mon.layers)} layers): {monitor_s * 1e3:.0f} ms per call, "
        f"{100.0 * monitor_s / 50 / base:.2f}% of the step at log_every_n_steps=50",
        flush=True,
    )
    return rows
