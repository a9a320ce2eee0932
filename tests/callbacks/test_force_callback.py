"""ForceRegularization inside real Lightning loops: exact gradient change, accumulation, AMP,
clipping order, pruned / parametrized weights, DDP, resume, schedules, logging, bad arguments."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyCNN, quiet_trainer, tiny_loader
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize, prune

from lightning_struct import ForceRegularization
from lightning_struct.callbacks.force import StrengthSchedule
from lightning_struct.ops.force import filter_rank, force_gradient, max_filter_rank, mean_pairwise_cosine

REGULARIZED = ["net.conv2", "net.conv3", "net.fc1"]  # default: not conv1 (first conv), not fc2 (classifier)


# ------------------------------------------------------------------------------------------
# a tiny model (module level: picklable for ddp_spawn); data and Trainer from helpers
# ------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv3(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyModule(TinyCNN):
    """The shared tiny classifier around :class:`TinyNet` (SGD, lr 0.05, momentum 0.9)."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__(net=TinyNet(), lr=lr, momentum=momentum)


class GradProbe(Callback):
    """Records every parameter's gradient (and weight) in ``on_before_optimizer_step``; placed
    before / after the force callback it sees the gradient before / after the force."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        )
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def check_exact_force(
    before: GradProbe,
    after: GradProbe,
    strengths: list[float],
    kind: str = "l2",
    scale: str = "authors",
    layers: list[str] = REGULARIZED,
    groups: dict[str, int] | None = None,
    tol: float = 1e-12,
) -> None:
    """after == before + strength * force(weight) on ``layers`` and untouched elsewhere."""
    groups = groups or {"net.conv3": 2}
    assert len(before.grads) == len(after.grads) == len(strengths)
    for g0, g1, w, lam in zip(before.grads, after.grads, before.weights, strengths):
        assert g0.keys() == g1.keys()
        for name in g0:
            layer = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and layer in layers:
                expected = g0[name] + lam * force_gradient(w[name], kind, scale, groups.get(layer, 1))
                torch.testing.assert_close(g1[name], expected, rtol=tol, atol=tol)
                if lam > 0:
                    assert not torch.equal(g1[name], g0[name]), name
            else:
                assert torch.equal(g1[name], g0[name]), f"{name} must not be touched"


# ------------------------------------------------------------------------------------------
# the gradient is changed exactly by strength * force
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("scale", ["authors", "gradient"])
def test_gradient_is_modified_exactly(kind: str, scale: str) -> None:
    pl.seed_everything(0)
    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.3, kind=kind, scale=scale, log_every_n_steps=None)
    quiet_trainer(callbacks=[before, cb, after], precision="64-true").fit(TinyModule(), tiny_loader())
    assert [layer.name for layer in cb.layers] == REGULARIZED
    assert cb.step == 4
    check_exact_force(before, after, [0.3] * 4, kind, scale)


def test_gradient_accumulation_applies_once_per_optimizer_step() -> None:
    pl.seed_everything(0)
    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.2, log_every_n_steps=None)
    quiet_trainer(callbacks=[before, cb, after], precision="64-true", accumulate_grad_batches=2).fit(
        TinyModule(), tiny_loader(n=32, batch_size=4)
    )
    assert cb.step == 4  # 8 batches / 2
    check_exact_force(before, after, [0.2] * 4)


def test_bf16_autocast_path() -> None:
    pl.seed_everything(0)
    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.5, kind="l1", log_every_n_steps=None)
    quiet_trainer(callbacks=[before, cb, after], precision="bf16-mixed").fit(TinyModule(), tiny_loader())
    assert cb.step == 4
    for g in after.grads:
        assert all(v.dtype == torch.float32 for v in g.values())
    check_exact_force(before, after, [0.5] * 4, kind="l1", tol=1e-5)


def test_fp16_gradscaler_force_sees_unscaled_gradients() -> None:
    """With a GradScaler (scale 2**12) the force is added after unscaling: the gradient the hook
    sees matches a plain float32 backward to fp16-autocast accuracy, not 4096x it."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    pl.seed_everything(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.5, log_every_n_steps=None)
    model = TinyModule()
    ref = copy.deepcopy(model)
    trainer = quiet_trainer(
        callbacks=[before, cb, after], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_steps=1
    )
    trainer.fit(model, tiny_loader())
    x, y = next(iter(tiny_loader()))
    ref.train()
    nn.functional.cross_entropy(ref(x), y).backward()
    for name, p in ref.named_parameters():
        if name.endswith("fc1.weight"):
            torch.testing.assert_close(before.grads[0][name], p.grad, rtol=0.05, atol=2e-3)
    check_exact_force(before, after, [0.5], tol=1e-6)


# ------------------------------------------------------------------------------------------
# clipping happens after the force
# ------------------------------------------------------------------------------------------
def test_force_is_added_before_gradient_clipping() -> None:
    pl.seed_everything(0)
    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.3, log_every_n_steps=None)
    stepped: list[dict[str, torch.Tensor]] = []

    class StepRecorder(Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            opt = trainer.optimizers[0]

            # Lightning runs the closure (forward/backward/hooks/clipping) inside optimizer.step, so
            # the gradients the update used are those present right after the step
            def post_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
                stepped.append(
                    {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
                )

            opt.register_step_post_hook(post_hook)

    max_norm = 1e-3
    trainer = quiet_trainer(
        callbacks=[before, cb, after, StepRecorder()],
        precision="64-true",
        gradient_clip_val=max_norm,
        gradient_clip_algorithm="norm",
    )
    trainer.fit(TinyModule(), tiny_loader())
    check_exact_force(before, after, [0.3] * 4)
    assert len(stepped) == 4
    for g_after, g_step in zip(after.grads, stepped):
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in g_after.values()]))
        coef = min(1.0, max_norm / (float(total) + 1e-6))  # torch.nn.utils.clip_grad_norm_
        for name in g_after:
            torch.testing.assert_close(g_step[name], g_after[name] * coef, rtol=1e-10, atol=1e-14)
        # clipped norm: the force was inside the clipped gradient
        step_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(v) for v in g_step.values()])
        )
        assert float(step_norm) == pytest.approx(max_norm, rel=1e-4)


# ------------------------------------------------------------------------------------------
# pruned and parametrized weights
# ------------------------------------------------------------------------------------------
class Doubled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * w


class PrunedModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        prune.random_unstructured(self.net.conv2, "weight", amount=0.4)
        parametrize.register_parametrization(self.net.fc1, "weight", Doubled())


def test_pruned_and_parametrized_weights_are_found() -> None:
    pl.seed_everything(0)
    model = PrunedModule()
    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.25, scale="gradient", log_every_n_steps=None)
    quiet_trainer(callbacks=[before, cb, after], precision="64-true").fit(model, tiny_loader())
    assert [layer.name for layer in cb.layers] == REGULARIZED
    mask = model.net.conv2.weight_mask
    for g0, g1, w in zip(before.grads, after.grads, before.weights):
        orig = "net.conv2.weight_orig"
        expected = g0[orig] + 0.25 * mask * force_gradient(w[orig] * mask, "l2", "gradient")
        torch.testing.assert_close(g1[orig], expected, rtol=1e-12, atol=1e-12)
        assert torch.all(g1[orig][mask == 0] == g0[orig][mask == 0])  # pruned entries untouched
        par = "net.fc1.parametrizations.weight.original"
        expected = g0[par] + 0.25 * force_gradient(w[par], "l2", "gradient")
        torch.testing.assert_close(g1[par], expected, rtol=1e-12, atol=1e-12)
        assert not torch.equal(g1[par], g0[par])


# ------------------------------------------------------------------------------------------
# schedules, stop, lazy application
# ------------------------------------------------------------------------------------------
def test_strength_schedule_values() -> None:
    s = StrengthSchedule("linear", 1.0, warmup_steps=2, total_steps=6, final_value=0.2)
    assert [s(i) for i in range(8)] == pytest.approx([0.0, 0.5, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    c = StrengthSchedule("cosine", 2.0, total_steps=4)
    assert [c(i) for i in range(6)] == pytest.approx(
        [2.0, 2 * (1 + math.cos(math.pi / 4)) / 2, 1.0, 2 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0]
    )
    st = StrengthSchedule("step", 1.0, milestones=(2, 4), gamma=0.5)
    assert [st(i) for i in range(6)] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    w = StrengthSchedule.from_mapping({"kind": "warmup", "value": 4.0, "warmup_steps": 4})
    assert [w(i) for i in range(6)] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 4.0])
    # a Hydra DictConfig works like a dict
    from omegaconf import OmegaConf

    cb = ForceRegularization(
        OmegaConf.create({"kind": "step", "value": 1.0, "milestones": [1], "gamma": 0.1})
    )
    assert cb.strength_at(0) == 1.0 and cb.strength_at(1) == pytest.approx(0.1)


def test_callable_schedule_stop_and_every_n_steps() -> None:
    pl.seed_everything(0)
    seen: list[int] = []

    def sched(step: int) -> float:
        seen.append(step)
        return 0.1 * (step + 1)

    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(sched, stop_after_steps=3, log_every_n_steps=None)
    quiet_trainer(callbacks=[before, cb, after], precision="64-true", max_epochs=2).fit(TinyModule(), tiny_loader())
    assert seen == [0, 1, 2]  # not called once stopped
    check_exact_force(before, after, [0.1, 0.2, 0.3, 0, 0, 0, 0, 0])

    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.1, every_n_steps=3, log_every_n_steps=None)
    quiet_trainer(callbacks=[before, cb, after], precision="64-true", max_epochs=2).fit(TinyModule(), tiny_loader())
    check_exact_force(before, after, [0.3, 0, 0, 0.3, 0, 0, 0.3, 0])


def test_bad_schedule_value_raises_naming_the_step() -> None:
    cb = ForceRegularization(lambda step: -1.0 if step == 2 else 0.1, log_every_n_steps=None)
    with pytest.raises(ValueError, match="at step 2"):
        quiet_trainer(callbacks=[cb], max_epochs=1).fit(TinyModule(), tiny_loader())


# ------------------------------------------------------------------------------------------
# selection, several optimizers
# ------------------------------------------------------------------------------------------
def test_selection_include_exclude_types() -> None:
    m = TinyModule()
    names = lambda cb: [layer.name for layer in cb.select(m)]  # noqa: E731
    assert names(ForceRegularization(1.0)) == REGULARIZED
    assert names(ForceRegularization(1.0, exclude="net.fc*")) == ["net.conv2", "net.conv3"]
    assert names(ForceRegularization(1.0, types=["Linear"])) == ["net.fc1"]
    assert names(ForceRegularization(1.0, include="net.conv*")) == ["net.conv1", "net.conv2", "net.conv3"]
    assert names(ForceRegularization(1.0, include=["net.fc2"])) == ["net.fc2"]
    assert [la.full_rank for la in ForceRegularization(1.0).select(m)] == [8, 8, 16]
    with pytest.raises(ValueError, match="match no"):
        ForceRegularization(1.0, include="net.nothing*").select(m)
    with pytest.raises(ValueError, match="not supported"):
        ForceRegularization(1.0, include="net.bn1").select(m)
    assert names(ForceRegularization(1.0, include=["net.bn1", "net.conv2"], on_unsupported="skip")) == [
        "net.conv2"
    ]
    with pytest.raises(ValueError, match="no layer selected"):
        ForceRegularization(1.0, exclude="*").select(m)


class TwoOptimizers(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        convs = [p for n, p in self.named_parameters() if "conv" in n or "bn" in n]
        fcs = [p for n, p in self.named_parameters() if "fc" in n]
        return [torch.optim.SGD(convs, lr=0.01), torch.optim.SGD(fcs, lr=0.01)]


def test_only_parameters_of_the_stepped_optimizer_are_touched() -> None:
    pl.seed_everything(0)
    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.3, log_every_n_steps=None)
    quiet_trainer(callbacks=[before, cb, after], precision="64-true", max_steps=4).fit(TwoOptimizers(), tiny_loader())
    # hook calls alternate: conv optimizer, fc optimizer; each time only its own layers change
    assert len(before.grads) == 4
    for k, (g0, g1) in enumerate(zip(before.grads, after.grads)):
        own = ["net.conv2", "net.conv3"] if k % 2 == 0 else ["net.fc1"]
        for layer in REGULARIZED:
            changed = not torch.equal(g0[f"{layer}.weight"], g1[f"{layer}.weight"])
            assert changed == (layer in own), (k, layer)


# ------------------------------------------------------------------------------------------
# logging
# ------------------------------------------------------------------------------------------
class RecordingLogger(pl.loggers.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "rec"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((int(step or 0), dict(metrics)))


def test_metrics_are_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_struct.callbacks.force as force_mod

    tables: list[tuple[str, list[str], list[list[Any]]]] = []
    monkeypatch.setattr(
        force_mod,
        "log_table",
        lambda trainer, key, columns, data, step=None: tables.append((key, list(columns), data)),
    )
    pl.seed_everything(0)
    logger = RecordingLogger()
    probe = GradProbe()
    cb = ForceRegularization(0.1, log_every_n_steps=2, energies=(0.9, 0.95))
    trainer = quiet_trainer(callbacks=[probe, cb], logger=logger, log_every_n_steps=1000, max_epochs=2)
    trainer.fit(TinyModule(), tiny_loader())
    # the network summary is also in callback_metrics (what `lightning-struct train` returns)
    last = cb.history[-1]
    for key in ("force/total_rank@0.95", "force/total_rank_fraction@0.9"):
        assert float(trainer.callback_metrics[key]) == pytest.approx(last[key])
    force_logs = [(s, m) for s, m in logger.records if "force/strength" in m]
    assert [s for s, _ in force_logs] == [0, 2, 4, 6]  # global steps of optimizer steps 0, 2, 4, 6
    assert len(cb.history) == 4 and len(tables) == 4
    step, m = force_logs[1]
    w = probe.weights[2]  # weights at optimizer step 2 (before its update)
    full = 0
    total = {0.9: 0, 0.95: 0}
    for layer in REGULARIZED:
        weight = w[f"{layer}.weight"]
        groups = 2 if layer == "net.conv3" else 1
        for e in (0.9, 0.95):
            r = filter_rank(weight, e, groups)
            assert m[f"force/{layer}/rank@{e:g}"] == r
            total[e] += r
        assert m[f"force/{layer}/mean_cos"] == pytest.approx(mean_pairwise_cosine(weight, groups), abs=1e-6)
        g = probe.grads[2][f"{layer}.weight"]
        ratio = 0.1 * float(force_gradient(weight, groups=groups).norm()) / float(g.norm())
        assert m[f"force/{layer}/force_grad_ratio"] == pytest.approx(ratio, rel=1e-4)
        full += max_filter_rank(weight, groups)
    assert m["force/full_rank"] == full
    for e in (0.9, 0.95):
        assert m[f"force/total_rank@{e:g}"] == total[e]
        assert m[f"force/total_rank_fraction@{e:g}"] == pytest.approx(total[e] / full)
    assert m["force/strength"] == pytest.approx(0.1) and m["force/monitor_ms"] > 0
    key, columns, rows = tables[0]
    assert key == "force/layers" and columns[:4] == ["layer", "full_rank", "rank@0.9", "rank@0.95"]
    assert [r[0] for r in rows] == REGULARIZED


# ------------------------------------------------------------------------------------------
# checkpoints: state and bit-identical resume
# ------------------------------------------------------------------------------------------
def test_state_dict_round_trip_and_state_key(caplog: pytest.LogCaptureFixture) -> None:
    a = ForceRegularization(0.1, kind="l2")
    a.step = 17
    b = ForceRegularization(0.1, kind="l2")
    assert a.state_dict() == {"step": 17, "kind": "l2", "scale": "authors", "strength": "0.1"}
    with caplog.at_level("WARNING", logger="lightning_struct.callbacks.force"):
        b.load_state_dict(a.state_dict())
    assert b.step == 17 and not caplog.records
    # every saved setting is read back: a resume with other settings is reported
    with caplog.at_level("WARNING", logger="lightning_struct.callbacks.force"):
        ForceRegularization(0.2, kind="l1").load_state_dict(a.state_dict())
    assert sorted(r.args[0] for r in caplog.records) == ["kind", "strength"]  # type: ignore[index]
    assert ForceRegularization(0.1, kind="l1").state_key != a.state_key
    assert ForceRegularization(0.1, include="net.*").state_key != a.state_key
    with pytest.raises(ValueError, match="no 'step'"):
        b.load_state_dict({})


def _weights(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _schedule() -> StrengthSchedule:
    # the strength changes every step across both epochs: resuming needs the schedule position
    return StrengthSchedule("linear", 0.5, warmup_steps=3, total_steps=8, final_value=0.05)


@pytest.mark.slow
def test_resume_at_epoch_boundary_is_bit_identical(tmp_path: Path) -> None:
    def fit(
        max_epochs: int, ckpt: str | None = None, seed_model: int = 0
    ) -> tuple[TinyModule, pl.Trainer, ForceRegularization]:
        pl.seed_everything(seed_model)
        model = TinyModule()
        cb = ForceRegularization(_schedule(), log_every_n_steps=None)
        trainer = quiet_trainer(callbacks=[cb], max_epochs=max_epochs)
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt)
        return model, trainer, cb

    straight, _, cb_straight = fit(2)
    half, trainer, _ = fit(1)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _, cb_resumed = fit(2, str(ckpt), seed_model=123)  # different init: weights come from the ckpt
    assert cb_resumed.step == cb_straight.step == 8
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # control: the same resume without the callback state (schedule restarts at 0) differs
    state = torch.load(ckpt, weights_only=False)
    state["callbacks"] = {}
    torch.save(state, tmp_path / "no_cb_state.ckpt")
    control, _, _ = fit(2, str(tmp_path / "no_cb_state.ckpt"))
    c = _weights(control)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("conv2.weight"))


# ------------------------------------------------------------------------------------------
# DDP: every rank applies the same force, weights stay identical
# ------------------------------------------------------------------------------------------
class SaveRankWeights(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        force = next(c for c in trainer.callbacks if isinstance(c, ForceRegularization))
        # parameters only: BatchNorm running statistics are per rank without SyncBatchNorm
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        payload = {"weights": params, "step": force.step}
        torch.save(payload, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_spawn_ranks_stay_identical(tmp_path: Path) -> None:
    pl.seed_everything(0)
    cb = ForceRegularization(0.5, kind="l1", log_every_n_steps=2)
    trainer = quiet_trainer(
        callbacks=[cb, SaveRankWeights(str(tmp_path))],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        use_distributed_sampler=True,
    )
    model = TinyModule()
    init = _weights(model)
    trainer.fit(model, tiny_loader(n=64))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] == 8  # 64 samples / 2 ranks / batch 8 * 2 epochs
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert not torch.equal(r0["weights"]["net.conv2.weight"], init["net.conv2.weight"])


# ------------------------------------------------------------------------------------------
# bad arguments fail at construction
# ------------------------------------------------------------------------------------------
BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"strength": -1.0}, ValueError, "strength=-1.0"),
    ({"strength": float("nan")}, ValueError, "strength=nan"),
    ({"strength": "big"}, TypeError, "strength must be"),
    ({"strength": {"kind": "exp", "value": 1.0}}, ValueError, "kind='exp'"),
    ({"strength": {"kind": "cosine", "value": 1.0}}, ValueError, "needs total_steps"),
    ({"strength": {"kind": "step", "value": 1.0}}, ValueError, "needs milestones"),
    ({"strength": {"kind": "step", "value": 1.0, "milestones": [5, 2]}}, ValueError, "increasing"),
    ({"strength": {"value": 1.0, "speed": 3}}, ValueError, "unknown key"),
    ({"strength": {"kind": "constant", "value": -2}}, ValueError, "value=-2"),
    ({"kind": "l3"}, ValueError, "kind='l3'"),
    ({"scale": "caffe"}, ValueError, "scale='caffe'"),
    ({"include": 3}, TypeError, "include must be"),
    ({"exclude": [1, 2]}, TypeError, "exclude must be"),
    ({"types": ["BatchNorm2d"]}, ValueError, "not supported"),
    ({"types": ["NoSuchLayer"]}, ValueError, "NoSuchLayer"),
    ({"types": ["ConvTranspose2d"]}, ValueError, "not supported"),
    ({"stop_after_steps": -1}, ValueError, "stop_after_steps=-1"),
    ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps=0"),
    ({"energies": []}, ValueError, "energies"),
    ({"energies": [0.95, 1.5]}, ValueError, "1.5"),
    ({"on_unsupported": "ignore"}, ValueError, "on_unsupported='ignore'"),
    ({"every_n_steps": 0}, ValueError, "every_n_steps=0"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD)
def test_bad_arguments_raise(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    args = {"strength": 1e-4, **kwargs}
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("(", r"\(")):
        ForceRegularization(**args)


def test_public_exports() -> None:
    import lightning_struct
    import lightning_struct.callbacks

    assert lightning_struct.ForceRegularization is ForceRegularization
    assert lightning_struct.callbacks.ForceRegularization is ForceRegularization
    fn: Callable[..., Any] = ForceRegularization
    assert "strength" in repr(fn(1e-4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_cuda_gradient_is_modified_exactly(kind: str) -> None:
    """On a GPU the callback takes the batched overflow check (one host sync per step)."""
    pl.seed_everything(0)
    before, after = GradProbe(), GradProbe()
    cb = ForceRegularization(0.3, kind=kind, log_every_n_steps=2)
    quiet_trainer(callbacks=[before, cb, after], accelerator="gpu", precision="32-true").fit(TinyModule(), tiny_loader())
    assert cb.step == 4 and cb.history
    check_exact_force(before, after, [0.3] * 4, kind, tol=1e-5)
