"""The conversion options, spelled once.

:class:`ConversionOptions` is the single place where the keys of a conversion are named,
defaulted and checked. :func:`~lightning_struct.surgery.convert`,
:class:`~lightning_struct.StructuredConversion`, the two-phase form and the ``conversion:``
config section all build one, so a key added here is accepted (and validated) everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_struct._checks import (
    check_bool,
    check_choice,
    check_globs,
    check_int,
    check_number,
    check_unknown,
)
from lightning_struct.ops import factorize as fz

__all__ = ["METHODS", "OPTION_KEYS", "RANK_RULES", "ConversionOptions"]

METHODS: tuple[str, ...] = ("lowrank", "acdc", "tied")
#: the low-rank rank rules; exactly one is given for ``method="lowrank"``
RANK_RULES: tuple[str, ...] = ("energy", "ratio", "rank", "budget")
BUDGET_ON: tuple[str, ...] = ("params", "flops", "latency")
#: runtimes a planned replacement can be timed in (``speed_check``)
SPEED_CHECKS: tuple[str, ...] = ("eager", "onnxruntime")
#: what a low-rank factorization minimizes: the weight error or the layer's output error
OBJECTIVES: tuple[str, ...] = ("weight", "output")


@dataclass(frozen=True)
class ConversionOptions:
    """What to convert and how (everything but the model and the calibration data).

    Attributes:
        method: ``"lowrank"``, ``"acdc"`` or ``"tied"``.
        energy: low-rank: keep this fraction of the squared singular values (e.g. ``0.95``).
        ratio: low-rank: keep this fraction of each layer's full rank.
        rank: low-rank: absolute rank per layer (a pair ``(R_in, R_out)`` allowed for tucker2).
        budget: low-rank: global budget over the selected layers, a fraction ``<= 1`` of their
            dense cost or an absolute count ``> 1``; ranks are allocated greedily.
        budget_on: ``"params"``, ``"flops"`` (multiply-accumulates; needs input shapes) or
            ``"latency"``: ``budget`` is a fraction of the dense model's measured forward latency
            (batch ``speed_batch``, in eager PyTorch). Each
            layer's candidate ranks are timed on its input shape (cached per shape and device),
            the allocation is greedy by retained (output, with ``objective="output"``) energy per
            second saved, and a layer is factorized only at ranks that time faster than dense.
        include: name globs of layers to convert. Default: every layer of ``types`` except the
            first conv (the stem) and the last ``Linear`` (the classifier), as
            :class:`~lightning_struct.ForceRegularization` does; give ``include`` (``"*"`` for
            all) to convert exactly the layers it names.
        exclude: name globs to leave alone.
        min_saving: a layer is replaced only if its parameter count falls by at least this
            fraction (default 0.1: a 36,864 -> 36,480 factorization stays dense) and its FLOPs,
            when the input shape is known, do not grow; otherwise it is reported "kept dense".
        types: layer classes (or names) to consider; defaults: lowrank ``Conv2d, Linear``;
            acdc ``Linear`` and ``1x1 Conv2d``; tied torchvision ``Bottleneck`` and ViT ``MLPBlock``.
        scheme: conv scheme for low-rank: ``"channel"``, ``"spatial"`` or ``"tucker2"``
            (linear layers always use the SVD).
        rank_multiple: low-rank with energy/ratio/rank: round each rank up to a multiple of this
            (e.g. 8: channel counts that vectorised conv kernels handle well); the rounded rank
            keeps at least the requested energy and is still checked for being cheaper.
        calibration_batches: at most this many batches are taken from an iterable calibration.
        input_size: per-example input shape (e.g. ``(3, 224, 224)``) used for FLOPs when no
            calibration is given.
        acdc_factors, acdc_relu, acdc_permute, acdc_sigma: ACDC stack hyper-parameters.
        acdc_steps, acdc_lr: Adam steps / learning rate of the layer-wise ACDC fit.
        tied_staged: tied: one shared ``W`` per stage (the tieable blocks under one parent
            module, e.g. ``layer3``) instead of one per block (Koyun & Toreyin's staged sharing).
        seed: seed of the ACDC permutations and of the fit's mini-batch sampling.
        speed_check: ``None`` (default), ``"eager"`` or ``"onnxruntime"``: time every planned
            replacement against its dense layer on the layer's input shape in that runtime
            (``lightning_struct.deploy.runtime.time_modules``, the measurement ``bench deploy``
            and ``export(fold="slower")`` use) and keep the dense layer when the replacement
            is not faster. Needs input shapes (a calibration or ``input_size``). With ``"eager"``
            the report's ``latency_ratio`` is then the whole converted network's measured
            forward time over the dense one's, whatever the rank rule.
        speed_batch: the batch size of those timings (default 1).
        objective: low-rank: ``"weight"`` (default: truncated SVD of each weight) or ``"output"``
            (the rank-r factors minimizing the layer's output error on the calibration inputs,
            closed form by whitening with the input covariance, SVD-LLM style; the rank rules then
            read the whitened spectrum). ``"output"`` needs calibration data and supports the
            channel scheme (``groups=1``) and Linear layers.
        sequential: with ``objective="output"``: fit the layers in forward order, each on the
            inputs it receives once the layers before it are converted (one partial calibration
            forward per layer), so its factors also correct the error arriving from upstream
            (reduced-rank regression of the dense outputs on those inputs) instead of letting
            it compound. The ranks are still planned on the dense inputs' spectra.

    Raises:
        ValueError / TypeError: at construction, naming the key, the value and what is allowed.
    """

    method: str = "lowrank"
    energy: float | None = None
    ratio: float | None = None
    rank: int | Sequence[int] | None = None
    budget: float | None = None
    budget_on: str = "params"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    min_saving: float = 0.1
    types: Sequence[type | str] | None = None
    scheme: str = "channel"
    rank_multiple: int = 1
    calibration_batches: int | None = 8
    input_size: Sequence[int] | None = None
    acdc_factors: int = 12
    acdc_relu: bool = True
    acdc_permute: bool = True
    acdc_sigma: float = 0.01
    acdc_steps: int = 300
    acdc_lr: float = 1e-2
    tied_staged: bool = False
    seed: int = 0
    speed_check: str | None = None
    speed_batch: int = 1
    objective: str = "weight"
    sequential: bool = False

    def __post_init__(self) -> None:
        where = f"convert(method={self.method!r})"
        check_choice(self.method, "method", METHODS, "convert")
        given = [n for n in RANK_RULES if getattr(self, n) is not None]
        if self.method == "lowrank":
            if len(given) != 1:
                raise ValueError(
                    f"{where} needs exactly one rank rule among {', '.join(RANK_RULES)}; got {given or 'none'}"
                )
            fz.check_scheme(self.scheme)
        elif given:
            raise ValueError(f"{where} takes no rank rule; got {given}")
        check_number(self.energy, "energy", where, minimum=0.0, maximum=1.0, open_min=True, optional=True)
        check_number(self.ratio, "ratio", where, minimum=0.0, maximum=1.0, open_min=True, optional=True)
        if self.budget is not None:
            check_number(self.budget, "budget", where, minimum=0.0, open_min=True)
        if self.rank is not None:
            ranks = [self.rank] if not isinstance(self.rank, Sequence) else list(self.rank)
            if not ranks or len(ranks) > 2:
                raise ValueError(f"{where}: rank={self.rank!r} must be an int or a pair of ints >= 1")
            for r in ranks:
                check_int(r, "rank", where, minimum=1)
        check_choice(self.budget_on, "budget_on", BUDGET_ON, where)
        if self.budget_on == "latency" and self.budget is not None and self.budget > 1.0:
            raise ValueError(f"{where}: budget_on='latency' takes budget as a fraction (<= 1) of the dense latency; got {self.budget}")
        if self.budget_on == "latency" and self.budget is not None and self.speed_check not in (None, "eager"):
            raise ValueError(
                f"{where}: budget_on='latency' times the model in eager PyTorch; leave speed_check unset or 'eager' "
                f"(got speed_check={self.speed_check!r})"
            )
        check_globs(self.include, "include", where)
        check_globs(self.exclude, "exclude", where)
        check_number(self.min_saving, "min_saving", where, minimum=0.0, maximum=1.0, open_max=True)
        check_int(self.rank_multiple, "rank_multiple", where, minimum=1)
        if self.rank_multiple > 1 and (self.method != "lowrank" or self.budget is not None):
            raise ValueError(f"{where}: rank_multiple applies to method='lowrank' with energy, ratio or rank (not budget)")
        check_int(self.calibration_batches, "calibration_batches", where, minimum=1, optional=True)
        if self.input_size is not None:
            if isinstance(self.input_size, str) or not isinstance(self.input_size, Sequence):
                raise ValueError(f"{where}: input_size={self.input_size!r} must be a per-example shape, e.g. [3, 224, 224]")
            for s in self.input_size:
                check_int(s, "input_size", where, minimum=1)
        check_int(self.acdc_factors, "acdc_factors", where, minimum=1)
        check_bool(self.acdc_relu, "acdc_relu", where)
        check_bool(self.acdc_permute, "acdc_permute", where)
        check_number(self.acdc_sigma, "acdc_sigma", where, minimum=0.0)
        check_int(self.acdc_steps, "acdc_steps", where, minimum=0)
        check_number(self.acdc_lr, "acdc_lr", where, minimum=0.0, open_min=True)
        check_bool(self.tied_staged, "tied_staged", where)
        check_int(self.seed, "seed", where)
        if self.speed_check is not None:
            check_choice(self.speed_check, "speed_check", SPEED_CHECKS, where)
        check_int(self.speed_batch, "speed_batch", where, minimum=1)
        check_choice(self.objective, "objective", OBJECTIVES, where)
        if self.objective == "output" and self.method != "lowrank":
            raise ValueError(f"{where}: objective='output' applies to method='lowrank'")
        check_bool(self.sequential, "sequential", where)
        if self.sequential and self.objective != "output":
            raise ValueError(f"{where}: sequential=True fits each layer to its calibration inputs: it needs objective='output'")
        if self.objective == "output" and self.scheme != "channel":
            raise ValueError(
                f"{where}: objective='output' supports scheme='channel' (and Linear layers); got scheme={self.scheme!r}"
            )

    # ------------------------------------------------------------------------------ building
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every option name (``method`` included)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "convert") -> ConversionOptions:
        """Build from a mapping (a config section, keyword arguments); ``None`` values mean default.

        Unknown keys are an error naming them (with a close match when there is one).
        """
        check_unknown(values, cls.keys(), "conversion key(s)", where)
        return cls(**{k: _plain(v) for k, v in values.items() if v is not None})

    def replace(self, **changes: Any) -> ConversionOptions:
        """A copy with ``changes`` applied (validated again)."""
        check_unknown(changes, self.keys(), "conversion key(s)", "ConversionOptions.replace")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (``types`` as names), e.g. for a checkpoint or a log."""
        out = dataclasses.asdict(self)
        if self.types is not None:
            out["types"] = [t if isinstance(t, str) else t.__name__ for t in self.types]
        return out


def _plain(value: Any) -> Any:
    """Config lists arrive as ``ListConfig``/tuples: hand plain lists/tuples to the checks."""
    if isinstance(value, (str, bytes, type)) or not isinstance(value, Sequence):
        return value
    return [_plain(v) for v in value]


OPTION_KEYS: tuple[str, ...] = ConversionOptions.keys()
