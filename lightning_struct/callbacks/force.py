"""ForceRegularization
^^^^^^^^^^^^^^^^^^^

Filter coordination (Wen et al., "Coordinating Filters for Faster Deep Neural Networks",
ICCV 2017): an attractive force between the filters of each layer, added to the gradient, that
pulls filters towards a common direction so the layer's filter matrix concentrates its energy
in few singular values (a low-rank approximation then loses little).

The story of the callback:

* **which hook**: ``on_before_optimizer_step``: after gradient accumulation and after AMP
  unscaling, before gradient clipping (Lightning's order), so the force is part of the clipped
  gradient exactly like coupled weight decay in the authors' Caffe solver;
* **which layers**: every Conv and Linear layer except the first conv and the classifier (the
  last Linear), or the ``include``/``exclude``/``types`` selection
  (:func:`lightning_struct.select.select_layers`); the trainable tensor is found with
  :func:`lightning_struct.select.weight_parameter` (pruning, parametrizations);
* **which op**: :func:`lightning_struct.ops.force.add_force_` with
  ``strength(step) * force``; deterministic, so every DDP rank applies the identical update
  and no communication is needed;
* **what is logged** (rank zero, every ``log_every_n_steps``): per layer the filter rank at each
  energy, the mean pairwise cosine of the filters and the ratio
  ``||strength * force|| / ||gradient||``; for the network the summed rank and the total rank
  fraction (sum of ranks / sum of full ranks) per energy, the strength and the monitoring wall
  time; a W&B table of the per-layer values when a ``WandbLogger`` is present.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_struct._checks import (
    check_choice,
    check_globs,
    check_int,
    check_number,
    check_unknown,
    is_int,
    is_number,
)
from lightning_struct.callbacks._log import log_scalars, log_table
from lightning_struct.ops.force import (
    KINDS,
    SCALES,
    add_force_,
    filter_ranks,
    force_gradient,
    max_filter_rank,
    mean_pairwise_cosine,
    weights_overflow_safe,
)
from lightning_struct.select import exclude_ends, resolve_types, select_layers, weight_parameter

log = logging.getLogger(__name__)

__all__ = ["ForceRegularization", "StrengthSchedule", "SCHEDULE_KINDS"]

SCHEDULE_KINDS: tuple[str, ...] = ("constant", "warmup", "linear", "cosine", "step")

#: layer types the force understands: weight ``(N, ...)`` with one filter per output unit
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ----------------------------------------------------------------------------------------------
# strength schedules
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrengthSchedule:
    """Strength ``lambda`` as a function of the optimizer step (``step = 0, 1, ...``).

    A linear warm-up from 0 to ``value`` over the first ``warmup_steps`` steps, then:

    * ``"constant"`` (alias ``"warmup"``): ``value``;
    * ``"linear"``: from ``value`` to ``final_value`` at ``total_steps``, then ``final_value``;
    * ``"cosine"``: half-cosine from ``value`` to ``final_value`` at ``total_steps``;
    * ``"step"``: ``value * gamma ** (number of milestones <= step)``.

    Hydra: ``strength: {kind: cosine, value: 1e-4, warmup_steps: 500, total_steps: 20000}`` (a
    mapping is turned into this class), or ``_target_: lightning_struct.callbacks.force.StrengthSchedule``.

    Args:
        kind: one of ``constant``, ``warmup``, ``linear``, ``cosine``, ``step``.
        value: the strength after warm-up (>= 0).
        warmup_steps: steps of the linear ramp from 0 (>= 0).
        total_steps: end of the linear / cosine phase (required for them, > ``warmup_steps``).
        final_value: the strength at and after ``total_steps`` (linear / cosine, >= 0).
        milestones: increasing steps at which ``"step"`` multiplies by ``gamma``.
        gamma: factor of ``"step"`` (> 0).
    """

    kind: str = "constant"
    value: float = 0.0
    warmup_steps: int = 0
    total_steps: int | None = None
    final_value: float = 0.0
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        where = "strength schedule"
        check_choice(self.kind, "kind", SCHEDULE_KINDS, where)
        # maximum=inf, open: finite
        check_number(self.value, "value", where, minimum=0, maximum=math.inf, open_max=True)
        check_number(self.final_value, "final_value", where, minimum=0, maximum=math.inf, open_max=True)
        check_number(self.gamma, "gamma", where, minimum=0, open_min=True, maximum=math.inf, open_max=True)
        check_int(self.warmup_steps, "warmup_steps", where, minimum=0)
        if self.kind in ("linear", "cosine"):
            t = self.total_steps
            if not is_int(t) or t <= self.warmup_steps:  # type: ignore[operator]
                raise ValueError(
                    f"{where}: kind={self.kind!r} needs total_steps (an int > warmup_steps={self.warmup_steps}), "
                    f"got {t!r}"
                )
        else:
            check_int(self.total_steps, "total_steps", where, minimum=0, optional=True)
        ms = tuple(self.milestones)
        object.__setattr__(self, "milestones", ms)
        if any(not is_int(m) or m < 0 for m in ms) or list(ms) != sorted(ms):
            raise ValueError(f"{where}: milestones={list(ms)!r} must be increasing ints >= 0")
        if self.kind == "step" and not ms:
            raise ValueError(f"{where}: kind='step' needs milestones, e.g. [1000, 2000]")

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> StrengthSchedule:
        """Build from a plain / Hydra mapping; unknown keys raise ``ValueError`` naming them."""
        data = {str(k): v for k, v in dict(spec).items() if k != "_target_"}
        check_unknown(data, cls.__dataclass_fields__, "key(s)", "strength schedule")
        if "milestones" in data and data["milestones"] is not None:
            data["milestones"] = tuple(int(m) for m in data["milestones"])
        for key in ("warmup_steps", "total_steps"):
            if isinstance(data.get(key), float) and float(data[key]).is_integer():
                data[key] = int(data[key])
        return cls(**data)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.value * step / self.warmup_steps
        if self.kind in ("constant", "warmup"):
            return self.value
        if self.kind == "step":
            return self.value * self.gamma ** sum(1 for m in self.milestones if step >= m)
        assert self.total_steps is not None
        p = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            return self.value + (self.final_value - self.value) * p
        return self.final_value + (self.value - self.final_value) * 0.5 * (1.0 + math.cos(math.pi * p))


StrengthSpec = float | StrengthSchedule | Mapping[str, Any] | Callable[[int], float]


def _as_schedule(strength: object) -> tuple[Callable[[int], float], str]:
    """(callable of the step, short description) from any accepted ``strength``."""
    if is_number(strength):
        v = float(strength)  # type: ignore[arg-type]
        # maximum=inf, open: finite
        check_number(strength, "strength", "ForceRegularization", minimum=0, maximum=math.inf, open_max=True)
        return StrengthSchedule("constant", v), repr(v)
    if isinstance(strength, StrengthSchedule):
        return strength, repr(strength)
    if isinstance(strength, Mapping):
        try:
            sched = StrengthSchedule.from_mapping(strength)
        except TypeError as err:
            raise ValueError(f"ForceRegularization: strength={dict(strength)!r}: {err}") from err
        return sched, repr(sched)
    if callable(strength):
        return strength, getattr(strength, "__name__", type(strength).__name__)
    raise TypeError(
        f"ForceRegularization: strength must be a number >= 0, a StrengthSchedule, a mapping "
        f"{{kind: {'|'.join(SCHEDULE_KINDS)}, value: ...}} or a callable step -> float; got {type(strength).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# the callback
# ----------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str
    module: nn.Module
    groups: int
    full_rank: int


class ForceRegularization(Callback):
    """Add ``strength * force`` to the weight gradients of the selected layers every optimizer step.

    Use it with any ``LightningModule``::

        from lightning_struct import ForceRegularization
        trainer = Trainer(callbacks=[ForceRegularization(strength=5e-5, kind="l2")])

    Args:
        strength: ``lambda``; one of

            * a number ``>= 0`` (constant);
            * a :class:`StrengthSchedule` or a mapping ``{kind: constant|warmup|linear|cosine|step, value: ..., ...}``;
            * a callable ``step -> float`` (``step`` counts optimizer steps from 0; it must return a
              finite number ``>= 0`` and be deterministic so every DDP rank agrees).

            The authors used 5e-5 (L2) at lr 1e-3 for AlexNet fine-tuning.
        kind: ``"l2"`` (the authors' "Degradation" force, ``O(N D)`` per layer) or ``"l1"``
            ("Constant", ``O(N^2 D)`` per layer: one Gram matmul and one more matmul).
        include: name globs of layers to regularize (names as in ``pl_module.named_modules()``,
            e.g. ``"net.features.*"``). ``None``: every layer of ``types`` except the first conv and
            the last Linear (the classifier), as the authors did. When ``include`` is given, exactly
            the matching layers are used (minus ``exclude``).
        exclude: name globs removed from the selection.
        types: layer classes or names (``"Conv2d"``, ``"Linear"``); default Conv1d/2d/3d and Linear.
            Only these (and their subclasses) are supported.
        scale: ``"authors"`` (``||W_i|| T_i_perp``, the Caffe solver) or ``"gradient"`` (the exact
            gradient of the pairwise energy).
        stop_after_steps: no force from this optimizer step on (the authors' ``force_iter``);
            ``None`` never stops.
        log_every_n_steps: log metrics every this many optimizer steps (rank zero); ``None``
            disables logging.
        energies: energy fractions in ``(0, 1]`` at which filter ranks are logged.
        on_unsupported: ``"raise"`` (default) or ``"skip"`` for layers named in ``include`` whose
            type (or weight, e.g. a multi-tensor parametrization) is not supported.
        every_n_steps: apply the force only every ``n`` optimizer steps, with ``n * strength``
            ("lazy regularization"; 1 = every step, exact). Divides the cost of ``kind="l1"`` by ``n``.

    Notes:
        * The force is computed from the trainable tensor: under ``torch.nn.utils.prune`` from
          ``weight_orig * weight_mask`` and multiplied by the mask (the chain rule), under a
          parametrization from ``parametrizations.weight.original``.
        * Only parameters of the optimizer being stepped are touched (several optimizers work).
        * The schedule position (optimizer steps seen) is saved in checkpoints, so a resumed run
          continues the schedule exactly.

    Raises:
        ValueError / TypeError: any bad argument, at construction time; at fit start, a selection
            that names unsupported layers or selects no layer.
    """

    def __init__(
        self,
        strength: StrengthSpec,
        kind: str = "l2",
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: Sequence[type | str] | type | str | None = None,
        scale: str = "authors",
        stop_after_steps: int | None = None,
        log_every_n_steps: int | None = 50,
        energies: Sequence[float] | float = (0.95,),
        on_unsupported: str = "raise",
        every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        where = "ForceRegularization"
        self.schedule, self._strength_repr = _as_schedule(strength)
        check_choice(kind, "kind", KINDS, where)
        check_choice(scale, "scale", SCALES, where)
        check_globs(include, "include", where)
        check_globs(exclude, "exclude", where)
        self.types = resolve_types(types, SUPPORTED_TYPES)
        bad = [t.__name__ for t in self.types if not issubclass(t, SUPPORTED_TYPES)]
        if bad:
            raise ValueError(
                f"ForceRegularization: types {bad} are not supported; supported: "
                f"{', '.join(t.__name__ for t in SUPPORTED_TYPES)} (and subclasses)"
            )
        check_int(stop_after_steps, "stop_after_steps", where, minimum=0, optional=True)
        check_int(log_every_n_steps, "log_every_n_steps", where, minimum=1, optional=True)
        check_int(every_n_steps, "every_n_steps", where, minimum=1)
        if is_number(energies):
            energies = (float(energies),)  # type: ignore[arg-type]
        if isinstance(energies, (str, bytes)) or not isinstance(energies, Sequence) or not energies:
            raise ValueError(f"{where}: energies={energies!r} must be a non-empty list of floats in (0, 1]")
        for i, e in enumerate(energies):
            check_number(e, f"energies[{i}]", where, minimum=0, open_min=True, maximum=1)
        check_choice(on_unsupported, "on_unsupported", ("raise", "skip"), where)

        self.kind = kind
        self.scale = scale
        self.include = include
        self.exclude = exclude
        self.stop_after_steps = stop_after_steps
        self.log_every_n_steps = log_every_n_steps
        self.energies = tuple(float(e) for e in energies)
        self.on_unsupported = on_unsupported
        self.every_n_steps = every_n_steps

        #: optimizer steps seen so far (the schedule's argument); saved in checkpoints
        self.step = 0
        #: the selected layers (set at fit start)
        self.layers: list[_Layer] = []
        #: the metrics of the latest logging step ({} before the first)
        self.last_metrics: dict[str, float] = {}
        #: every logged metrics dict, with ``"step"`` (kept in memory; for plots and tests)
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(kind=self.kind, include=self.include, exclude=self.exclude)

    def __repr__(self) -> str:
        return (
            f"ForceRegularization(strength={self._strength_repr}, kind={self.kind!r}, scale={self.scale!r}, "
            f"layers={len(self.layers)}, step={self.step})"
        )

    # ------------------------------------------------------------------ selection
    def select(self, model: nn.Module) -> list[_Layer]:
        """Resolve the layers of ``model`` this callback regularizes (also used at fit start)."""
        exclude, _ = exclude_ends(model, self.include, self.exclude)
        chosen = select_layers(
            model,
            self.types,
            self.include,
            exclude,
            on_unsupported=self.on_unsupported,  # type: ignore[arg-type]
            supported=SUPPORTED_TYPES,
            what="ForceRegularization",
        )
        layers: list[_Layer] = []
        for name, module in chosen:
            try:
                weight_parameter(module)
            except (TypeError, AttributeError) as err:
                msg = f"ForceRegularization: layer {name!r} has no single trainable weight tensor ({err})"
                if self.on_unsupported == "raise":
                    raise ValueError(msg + "; exclude it or pass on_unsupported='skip'") from err
                log.warning(msg + "; skipped")
                continue
            groups = int(getattr(module, "groups", 1))
            w = self._effective_weight(module)[0]
            layers.append(_Layer(name, module, groups, max_filter_rank(w, groups)))
        if not layers:
            raise ValueError(
                f"ForceRegularization: no layer selected in {type(model).__name__} "
                f"(include={self.include!r}, exclude={self.exclude!r}, types={[t.__name__ for t in self.types]}); "
                "the default leaves out the first conv and the classifier"
            )
        return layers

    @staticmethod
    def _effective_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight the force is computed from, mask or None)`` for the trainable tensor."""
        p = weight_parameter(module)
        mask = getattr(module, "weight_mask", None)
        if mask is not None and "weight_orig" in module._parameters:
            return p.detach() * mask, mask
        return p.detach(), None

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = self.select(pl_module)
        log.info(
            "ForceRegularization(%s, %s) on %d layers: %s",
            self.kind,
            self.scale,
            len(self.layers),
            ", ".join(layer.name for layer in self.layers),
        )

    def on_structure_change(self, trainer: pl.Trainer, pl_module: pl.LightningModule, changed: list[str]) -> None:
        """Policy after a conversion: regularize the layers still in the model, stop on the replaced ones.

        The factors of a converted layer are not pulled together (their rank is already chosen);
        the rank metrics go on over the remaining layers, and the dropped ones are named once.
        """
        alive = {id(m) for m in pl_module.modules()}
        dropped = [layer.name for layer in self.layers if id(layer.module) not in alive]
        self.layers = [layer for layer in self.layers if id(layer.module) in alive]
        if dropped:
            rank_zero_info(
                f"ForceRegularization: {len(dropped)} replaced layer(s) no longer regularized "
                f"({len(self.layers)} remain): {', '.join(dropped)}"
            )

    def strength_at(self, step: int) -> float:
        """The strength applied at optimizer step ``step`` (0 once stopped)."""
        if self.stop_after_steps is not None and step >= self.stop_after_steps:
            return 0.0
        value = float(self.schedule(step))
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"ForceRegularization: strength schedule returned {value!r} at step {step}; need >= 0"
            )
        return value

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.layers:  # used outside fit (e.g. called directly): select now
            self.layers = self.select(pl_module)
        step = self.step
        self.step += 1
        lam = self.strength_at(step)
        apply = lam > 0 and step % self.every_n_steps == 0
        alpha = lam * self.every_n_steps
        monitor = (
            self.log_every_n_steps is not None
            and step % self.log_every_n_steps == 0
            and trainer.is_global_zero
        )
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        work = []
        for layer in self.layers:
            p = weight_parameter(layer.module)
            if id(p) in in_optimizer and p.grad is not None:
                work.append((layer, p, *self._effective_weight(layer.module)))
        # off the CPU, one batched overflow check instead of one host sync per layer
        check = not (
            apply
            and work
            and work[0][2].device.type != "cpu"
            and weights_overflow_safe([w for _, _, w, _ in work])
        )
        rows: list[list[Any]] = []
        metrics: dict[str, float] = {}
        monitor_s = 0.0
        for layer, p, weight, mask in work:
            if monitor:
                grad_norm = float(torch.linalg.vector_norm(p.grad.detach()))
            if apply:
                if mask is None:
                    add_force_(
                        p.grad, weight, alpha, self.kind, self.scale, layer.groups, check_overflow=check
                    )  # type: ignore[arg-type]
                else:  # d/d(orig) of E(orig * mask) = mask * dE/dW
                    force = force_gradient(weight, self.kind, self.scale, layer.groups)  # type: ignore[arg-type]
                    p.grad.add_(force.mul_(mask), alpha=alpha)
            if monitor:
                t0 = time.perf_counter()
                rows.append(
                    self._layer_metrics(layer, weight, mask, grad_norm, alpha if apply else 0.0, metrics)
                )
                monitor_s += time.perf_counter() - t0
        if monitor and rows:
            self._log(trainer, pl_module, step, lam, rows, metrics, monitor_s)

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def _layer_metrics(
        self,
        layer: _Layer,
        weight: torch.Tensor,
        mask: torch.Tensor | None,
        grad_norm: float,
        alpha: float,
        metrics: dict[str, float],
    ) -> list[Any]:
        ranks = filter_ranks(weight, self.energies, layer.groups)
        cos = mean_pairwise_cosine(weight, layer.groups)
        if alpha > 0:
            force = force_gradient(weight, self.kind, self.scale, layer.groups)  # type: ignore[arg-type]
            if mask is not None:
                force.mul_(mask)
            force_norm = alpha * float(torch.linalg.vector_norm(force))
        else:
            force_norm = 0.0
        ratio = force_norm / grad_norm if grad_norm > 0 else (0.0 if force_norm == 0 else math.inf)
        prefix = f"force/{layer.name}"
        for e, r in zip(self.energies, ranks):
            metrics[f"{prefix}/rank@{e:g}"] = r
        metrics[f"{prefix}/mean_cos"] = cos
        metrics[f"{prefix}/force_grad_ratio"] = ratio
        return [layer.name, layer.full_rank, *ranks, cos, ratio]

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        step: int,
        lam: float,
        rows: list[list[Any]],
        metrics: dict[str, float],
        seconds: float,
    ) -> None:
        full = sum(r[1] for r in rows)
        for k, e in enumerate(self.energies):
            total = sum(r[2 + k] for r in rows)
            metrics[f"force/total_rank@{e:g}"] = total
            metrics[f"force/total_rank_fraction@{e:g}"] = total / full if full else 0.0
        metrics["force/full_rank"] = full
        metrics["force/strength"] = lam
        metrics["force/monitor_ms"] = 1e3 * seconds
        self.last_metrics = dict(metrics)
        self.history.append({"step": float(step), **metrics})
        log_scalars(trainer, metrics, step=trainer.global_step)
        # the network summary also into trainer.callback_metrics (not to the loggers again), so
        # `lightning-struct train` returns it and a sweep can use it as `optimized_metric`
        summary = {k: float(v) for k, v in metrics.items() if k.startswith("force/total_rank")}
        if getattr(pl_module, "_current_fx_name", None) is not None:
            pl_module.log_dict(summary, on_step=True, on_epoch=False, logger=False, rank_zero_only=True)
        columns = [
            "layer",
            "full_rank",
            *[f"rank@{e:g}" for e in self.energies],
            "mean_cos",
            "force_grad_ratio",
        ]
        log_table(trainer, "force/layers", columns, rows, step=trainer.global_step)

    # ------------------------------------------------------------------ state
    def _identity(self) -> dict[str, str]:
        """The settings a checkpoint records so a resume with other settings is noticed."""
        return {"kind": self.kind, "scale": self.scale, "strength": self._strength_repr}

    @override
    def state_dict(self) -> dict[str, Any]:
        """``{"step": ..., "kind": ..., "scale": ..., "strength": ...}``: the schedule position and
        the settings it was reached with (``strength`` as its short description)."""
        return {"step": self.step, **self._identity()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the schedule at the saved step; warn where the saved settings differ."""
        if "step" not in state_dict:
            raise ValueError(
                f"ForceRegularization: checkpoint state has no 'step' (keys: {sorted(state_dict)})"
            )
        self.step = int(state_dict["step"])
        for key, current in self._identity().items():
            if key in state_dict and state_dict[key] != current:
                log.warning(
                    "ForceRegularization: resuming with %s=%r but the checkpoint was written with %s=%r",
                    key,
                    current,
                    key,
                    state_dict[key],
                )

    def schedule_dict(self) -> dict[str, Any]:
        """The schedule as a plain dict (empty for a user callable); handy for logging hparams."""
        return asdict(self.schedule) if isinstance(self.schedule, StrengthSchedule) else {}
