r"""
SpectralMonitor
^^^^^^^^^^^^^^^

Watch the exact singular values of every convolution while a model trains.

"Spectral norm" here is the operator norm of the convolution itself on the layer's real input
resolution (periodic boundary), computed per frequency by Local Fourier Analysis
(:mod:`lightning_struct.ops.spectral`), not the reshape bound that
``torch.nn.utils.spectral_norm`` normalises by (that one is logged beside it, under its own name).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_struct._checks import check_bool, check_choice, check_globs, check_int, check_number
from lightning_struct.callbacks._log import log_scalars, log_wandb, wandb_loggers
from lightning_struct.callbacks._log import run_dir as _run_dir
from lightning_struct.nn.lowrank import LowRankConv2d, LowRankLinear
from lightning_struct.ops.spectral import (
    CONV_TYPES,
    SPECTRUM_STATS,
    SUPPORTED_TYPES,
    LayerSpectrum,
    NormState,
    clip_conv_operator_norm,
    lipschitz_bound,
    model_spectra,
    padded_conv_norm,
)
from lightning_struct.select import InputSizeRecorder, resolve_types, select_layers, weight_parameter
from lightning_struct.surgery import CONVERTED_TYPES

log = logging.getLogger(__name__)

_WHERE = "SpectralMonitor"
#: heavy-tailed ESD statistics (WeightWatcher's) logged at the epoch-end full passes
ESD_KEYS: tuple[str, ...] = ("alpha", "alpha_weighted", "log_spectral_norm")
#: sorted spectra kept per layer for the over-time views (the first epoch and the latest)
_MAX_EPOCH_LINES = 24
#: steps kept in the trend charts (older ones are thinned, every other one dropped)
_MAX_TREND_POINTS = 128
TREND_STATS: tuple[str, ...] = ("sigma_max", "condition_number")


class SpectralMonitor(Callback):
    """Log exact per-layer spectra (LFA) of conv and linear layers during training.

    Per selected layer, every ``every_n_steps`` optimizer steps and at the end of every
    ``full_every_n_epochs``-th training epoch, it logs (through every logger of the Trainer)::

        spectral/<layer>/sigma_max         operator norm on the layer's real input size
        spectral/<layer>/sigma_min         smallest singular value
        spectral/<layer>/condition_number  sigma_max / sigma_min
        spectral/<layer>/stable_rank       sum sigma^2 / sigma_max^2
        spectral/<layer>/effective_rank    exp(entropy of sigma / sum sigma)
        spectral/<layer>/reshape_bound     sqrt(k1*k2) * sigma_max(W as C_out x C_in*k*k) (an upper bound)
        spectral/block/<block>/lipschitz_bound   per residual block (see below)
        spectral/<layer>/alpha, alpha_weighted, log_spectral_norm   (epoch-end passes) the
                                           power-law exponent of the ESD of sigma^2 (Clauset et al.
                                           MLE, KS-chosen xmin: :mod:`lightning_struct.ops.esd`),
                                           WeightWatcher's metrics on the exact operator spectrum
        spectral/time_s                    wall time of this monitoring pass

    Lipschitz figures. One product of all layers' ``sigma_max`` bounds nothing in a residual
    network with normalisation (it reaches 1e10-1e15 on a ResNet), so it is logged only with
    ``lipschitz="chain"`` (``spectral/lipschitz_bound``: a bound for a plain chain of the selected
    layers with 1-Lipschitz activations, the user's claim to make). What is always logged, for
    every residual block whose convs are all monitored (torchvision ``BasicBlock`` /
    ``Bottleneck``, :mod:`lightning_struct.models.resnet_cifar`), is an honest bound of that block
    in eval mode: ``L(shortcut) + prod_i sigma_max(conv_i) * max|gamma_i / sqrt(var_i + eps)|``
    (each BatchNorm is a per-channel scaling; identity or option-A shortcuts count 1).

    At epoch end (``full_every_n_epochs``) it also draws, in ``<run dir>/spectra/``:
    ``epoch_<NNN>.png`` (small multiples of every layer's sorted spectrum, zeros counted not
    drawn), ``heatmap.png`` (sigma_max / condition number / stable rank, layers by epochs) and
    ``over_time.png`` (each layer's spectra of all epochs so far), and writes ``summary.json``
    (the last statistics and every epoch's, readable without W&B). With a ``WandbLogger`` it logs
    the three figures (``spectral/plot``, ``spectral/heatmap``, ``spectral/over_time``), one
    table of every layer's statistics (``spectral/table``), a line chart of the sorted spectrum
    at each epoch so far per layer (``spectral_lines/<layer>``), line charts of sigma_max and the
    condition number over the steps of every pass so far, grouped by network stage
    (``spectral_trends/<stat> <stage>``),
    every ``histogram_every_n_epochs`` a ``wandb.Histogram`` per layer (``spectral_hist/<layer>``),
    and at the end of training the final statistics in the run's ``summary``
    (``spectral_final/<layer>/<stat>``).

    Each layer's input resolution is learned from a forward pre-hook on the first training batch
    (no user input). All work runs under ``torch.no_grad()`` on rank zero only; a layer whose
    weights hold NaN/inf is logged as NaN with a warning, and never stops training.

    Optional operator-norm clipping (Sedghi et al. 2019): with ``max_norm`` set, every
    ``clip_every_n_steps`` steps each selected conv kernel is projected so that its periodic
    operator norm is at most ``max_norm`` (``clip_n_iter`` alternating projections). This changes
    weights, so it runs identically on every rank (deterministic). Linear layers are not clipped.

    Args:
        every_n_steps: optimizer-step period of the step-level statistics; ``None`` or 0: only at
            epoch end.
        step_stats: ``"full"`` (all statistics from the full spectrum) or ``"norm"`` (only
            ``sigma_max`` by the fast spectral-norm path; recommended for big nets and small periods).
        full_every_n_epochs: epoch period of the full-spectrum pass (plots, histograms, tables);
            ``None`` or 0 disables it.
        include: layer-name globs (``None``: every layer of ``types``).
        exclude: layer-name globs removed from the selection.
        types: layer classes or names (default Conv1d/2d/3d and Linear).
        on_unsupported: ``"raise"`` or ``"skip"`` for a layer named in ``include`` that is not supported.
        plot: save the epoch-end PNG in the run directory.
        histogram_bins: bins of the W&B histograms (<= 512).
        histogram_every_n_epochs: epoch period of the W&B histograms (``0``: never).
        boundary: ``"periodic"`` (default: the LFA spectrum, exact for the periodic operator) or
            ``"both"``: for every conv with zero padding, also ``spectral/<layer>/sigma_max_padded``,
            the norm of the operator PyTorch applies (zero padding, real input size) by restarted
            Lanczos with exact adjoints, warm-started from the previous call (about 21 conv
            pairs of one example per layer and call once warm; 63 cold).
        lipschitz: ``"none"`` (default) or ``"chain"``: also log the product of all selected
            layers' ``sigma_max`` as ``spectral/lipschitz_bound`` (meaningful for plain chains).
        max_norm: clip conv operator norms to this value (``None``: no clipping).
        clip_every_n_steps: clipping period in optimizer steps (required with ``max_norm``).
        clip_n_iter: alternating projections per clipping.
        dtype: compute dtype of the spectra (``None``: float32 for float32 weights, float64 for float64).
        method: full-spectrum method of :func:`lightning_struct.ops.spectral.conv_spectrum`:
            ``"svd"`` (default; small singular values, ``sigma_min`` and the condition number
            accurate to ~1e-7 sigma_max in float32), ``"gram"`` (about 2x faster; singular values
            below ~1e-3 sigma_max are only resolved to that floor in float32) or ``"auto"``.
        warm_norms: with ``step_stats="norm"``, start every layer's norm from the last pass
            (:func:`lightning_struct.ops.spectral.warm_conv_spectral_norm`: the last top Ritz
            vector per frequency, and only the frequencies that can still hold the maximum after
            the weights' move); same values to the Lanczos tolerance, a few times faster. It holds
            a copy of each monitored weight and one vector per frequency; not checkpointed (the
            first pass after a resume is cold). ``False``: every pass from scratch.

    Raises:
        ValueError: for a bad argument (named in the message, with what is allowed), at
            construction time; ``TypeError`` for a ``plot`` that is not a bool or a malformed
            ``include`` / ``exclude``.
    """

    def __init__(
        self,
        every_n_steps: int | None = 200,
        step_stats: Literal["full", "norm"] = "full",
        full_every_n_epochs: int | None = 1,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: Sequence[type | str] | None = None,
        on_unsupported: Literal["raise", "skip"] = "raise",
        plot: bool = True,
        histogram_bins: int = 64,
        histogram_every_n_epochs: int = 1,
        lipschitz: Literal["none", "chain"] = "none",
        boundary: Literal["periodic", "both"] = "periodic",
        max_norm: float | None = None,
        clip_every_n_steps: int | None = None,
        clip_n_iter: int = 1,
        dtype: torch.dtype | None = None,
        method: Literal["auto", "gram", "svd"] = "svd",
        warm_norms: bool = True,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", _WHERE, minimum=0, optional=True) or 0
        self.step_stats = check_choice(step_stats, "step_stats", ("full", "norm"), _WHERE)
        self.full_every_n_epochs = (
            check_int(full_every_n_epochs, "full_every_n_epochs", _WHERE, minimum=0, optional=True) or 0
        )
        check_globs(include, "include", _WHERE)
        check_globs(exclude, "exclude", _WHERE)
        # kept as given: they make the checkpoint state key
        self.include = include
        self.exclude = exclude
        self.types = resolve_types(types, SUPPORTED_TYPES)
        unsupported = [t.__name__ for t in self.types if not issubclass(t, SUPPORTED_TYPES)]
        if unsupported:
            raise ValueError(f"{_WHERE}: types {unsupported} are not supported; allowed: Conv1d/2d/3d, Linear")
        self.on_unsupported = check_choice(on_unsupported, "on_unsupported", ("raise", "skip"), _WHERE)
        self.plot = check_bool(plot, "plot", _WHERE)
        self.histogram_bins = check_int(histogram_bins, "histogram_bins", _WHERE, minimum=1, maximum=512)  # W&B limit
        self.histogram_every_n_epochs = check_int(histogram_every_n_epochs, "histogram_every_n_epochs", _WHERE, minimum=0)
        self.lipschitz = check_choice(lipschitz, "lipschitz", ("none", "chain"), _WHERE)
        self.boundary = check_choice(boundary, "boundary", ("periodic", "both"), _WHERE)
        self._padded_start: dict[str, torch.Tensor] = {}
        self.max_norm = check_number(
            max_norm, "max_norm", _WHERE, minimum=0, maximum=math.inf, open_min=True, open_max=True, optional=True
        )
        self.clip_every_n_steps = check_int(clip_every_n_steps, "clip_every_n_steps", _WHERE, minimum=1, optional=True)
        if self.max_norm is not None and self.clip_every_n_steps is None:
            raise ValueError(
                f"{_WHERE}: clip_every_n_steps=None; an int >= 1 is required with max_norm={self.max_norm:g}"
            )
        self.clip_n_iter = check_int(clip_n_iter, "clip_n_iter", _WHERE, minimum=1)
        self.dtype = check_choice(dtype, "dtype", (None, torch.float32, torch.float64), _WHERE)
        self.method = check_choice(method, "method", ("auto", "gram", "svd"), _WHERE)
        self.warm_norms = check_bool(warm_norms, "warm_norms", _WHERE)
        #: per layer: what the warm norm path carries from one step pass to the next
        self._norm_states: dict[str, NormState] = {}

        self.layers: list[tuple[str, nn.Module]] = []
        self.input_sizes: dict[str, tuple[int, ...]] = {}
        self._recorder: InputSizeRecorder | None = None
        self._warned_nonfinite: set[str] = set()
        # schedule state (saved in checkpoints): a step is logged / clipped at most once, also
        # when several batches share it (gradient accumulation) and across a resume
        self._last_step_logged = -1
        self._last_clip_step = -1
        #: per layer: {"epoch <e>": downsampled sorted spectrum} for the W&B line charts
        self.history: dict[str, dict[str, np.ndarray]] = {}
        #: the statistics of the last pass, {layer: {stat: value}}
        self.last_stats: dict[str, dict[str, float]] = {}
        #: the statistics of every epoch-end pass, {epoch: {layer: {stat: value}}}
        self.stats_history: dict[int, dict[str, dict[str, float]]] = {}
        #: sigma_max / condition number of every pass (step-level and epoch-end), {step: {layer: {stat: value}}},
        #: thinned to at most _MAX_TREND_POINTS steps: the W&B trend charts
        self.trend: dict[int, dict[str, dict[str, float]]] = {}
        #: residual blocks and their bounds at the last pass, {block: bound}
        self.block_bounds: dict[str, float] = {}
        self.last_plot: Path | None = None

    # ----------------------------------------------------------------------------- setup
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    def _select(self, pl_module: nn.Module, on_unsupported: str) -> list[tuple[str, nn.Module]]:
        """The monitored layers: conv/linear layers and low-rank layers (as the operator they compute).

        Layers inside a converted module (the factors of a low-rank layer, the parts of ACDC or
        tied blocks) are not monitored on their own.
        """
        extra: list[type] = []
        if any(issubclass(t, CONV_TYPES) for t in self.types):
            extra.append(LowRankConv2d)
        if any(issubclass(t, nn.Linear) for t in self.types):
            extra.append(LowRankLinear)
        chosen = select_layers(
            pl_module,
            (*self.types, *extra),
            self.include,
            self.exclude,
            on_unsupported=on_unsupported,  # type: ignore[arg-type]
            supported=(*SUPPORTED_TYPES, *extra),
            what=_WHERE,
        )
        inside = [n for n, m in pl_module.named_modules() if n and isinstance(m, CONVERTED_TYPES)]
        return [(n, m) for n, m in chosen if not any(n.startswith(c + ".") for c in inside)]

    def _record_missing_sizes(self) -> None:
        if self._recorder is not None:
            self._recorder.detach()
            self._recorder = None
        for n, m in self.layers:
            if isinstance(m, (nn.Linear, LowRankLinear)):
                self.input_sizes[n] = ()
        missing = [(n, m) for n, m in self.layers if n not in self.input_sizes]
        if missing:
            self._recorder = InputSizeRecorder(missing).attach()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layers = self._select(pl_module, self.on_unsupported)
        if not self.layers:
            log.warning("SpectralMonitor: no layer of %s selected; nothing will be logged", [t.__name__ for t in self.types])
        if self._recorder is None:
            self._record_missing_sizes()

    def on_structure_change(self, trainer: pl.Trainer, pl_module: pl.LightningModule, changed: list[str]) -> None:
        """Follow a conversion / FFT swap: monitor the modules now in the model, not the dead ones.

        A low-rank layer is monitored as the operator it computes (its exact dense equivalent);
        ACDC and tied layers are not convolutions of one kernel: they are named once and dropped.
        """
        before = {n for n, _ in self.layers}
        self.layers = self._select(pl_module, "skip")
        now = {n for n, _ in self.layers}
        dropped = sorted(n for n in changed if n in before and n not in now)
        if dropped:
            rank_zero_info(
                f"SpectralMonitor: {len(dropped)} converted layer(s) are no longer monitored (not a single "
                f"conv/linear operator): {', '.join(dropped)}"
            )
        for name in list(self.last_stats):
            if name not in now:
                del self.last_stats[name]
        for name in changed:
            self._norm_states.pop(name, None)
        self._record_missing_sizes()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._recorder is not None:
            self._recorder.detach()
            self._recorder = None

    def _collect_sizes(self) -> bool:
        """Move recorded sizes in; True once every selected conv has one."""
        rec = self._recorder
        if rec is not None:
            self.input_sizes.update(rec.sizes)
            if rec.complete:
                rec.detach()
                self._recorder = None
        return all(n in self.input_sizes for n, _ in self.layers)

    # ----------------------------------------------------------------------------- hooks
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ready = self._collect_sizes()
        step = trainer.global_step
        if not ready or trainer.sanity_checking:
            return
        if self.max_norm is not None and self.clip_every_n_steps and step > 0:
            if step % self.clip_every_n_steps == 0 and step != self._last_clip_step:
                self._last_clip_step = step
                self._clip()
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step_logged:
            self._last_step_logged = step
            if trainer.is_global_zero:
                self._pass(trainer, full=self.step_stats == "full", epoch_end=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs_done = trainer.current_epoch + 1
        if not self.full_every_n_epochs or epochs_done % self.full_every_n_epochs:
            return
        if not self._collect_sizes() or not trainer.is_global_zero:
            return
        self._pass(trainer, full=True, epoch_end=True)

    # ----------------------------------------------------------------------------- work
    @torch.no_grad()
    def _clip(self) -> None:
        for name, module in self.layers:
            if not isinstance(module, CONV_TYPES):
                continue
            param = weight_parameter(module)
            if param.shape != module.weight.shape or not torch.isfinite(param).all():
                continue  # pruned/parametrized kernels are not clipped; NaN weights are left alone
            new = clip_conv_operator_norm(
                param.detach(),
                self.input_sizes[name],
                self.max_norm,  # type: ignore[arg-type]
                stride=module.stride,
                dilation=module.dilation,
                groups=module.groups,
                n_iter=self.clip_n_iter,
            )
            param.copy_(new.to(param.dtype))

    def _spectra(self, full: bool) -> dict[str, LayerSpectrum]:
        # a low-rank layer is the conv / linear operator its factors compose to (exact)
        operators = [
            (n, m.to_dense() if isinstance(m, (LowRankConv2d, LowRankLinear)) else m) for n, m in self.layers
        ]
        states = self._norm_states if (self.warm_norms and not full) else None
        spectra = model_spectra(
            operators,
            self.input_sizes,
            stats="full" if full else "norm",
            method=self.method,
            dtype=self.dtype,
            states=states,
        )
        for name, layer in spectra.items():
            if not layer.finite and name not in self._warned_nonfinite:
                self._warned_nonfinite.add(name)
                log.warning("SpectralMonitor: layer %r has NaN/inf weights; its statistics are logged as NaN", name)
        return spectra

    def compute(self, full: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
        """Statistics (and, with ``full``, all singular values) of every selected layer now."""
        spectra = self._spectra(full)
        stats = {name: layer.stats for name, layer in spectra.items()}
        values = {name: layer.values for name, layer in spectra.items() if layer.values is not None}
        return stats, values

    def _pass(self, trainer: pl.Trainer, full: bool, epoch_end: bool) -> None:
        t0 = time.perf_counter()
        try:
            spectra = self._spectra(full)
        except Exception as err:  # monitoring must never stop training
            log.warning("SpectralMonitor: spectra failed at step %d: %s", trainer.global_step, err)
            return
        stats = {name: layer.stats for name, layer in spectra.items()}
        if self.boundary == "both":
            self._padded_norms(stats)
        self.last_stats = stats
        metrics = {f"spectral/{name}/{key}": val for name, st in stats.items() for key, val in st.items()}
        if stats and self.lipschitz == "chain":
            metrics["spectral/lipschitz_bound"] = lipschitz_bound(spectra)
        self._record_trend(trainer.global_step, stats)
        self.block_bounds = residual_block_bounds(trainer.lightning_module, stats)
        metrics.update({f"spectral/block/{name}/lipschitz_bound": b for name, b in self.block_bounds.items()})
        if epoch_end:
            values = {name: layer.values for name, layer in spectra.items() if layer.values is not None}
            modules = dict(self.layers)
            for name, v in values.items():  # the practitioners' heavy-tail metrics, on the exact operator spectrum
                stats[name].update(layer_esd(modules.get(name), v))
            metrics.update({f"spectral/{n}/{k}": stats[n][k] for n in values for k in ESD_KEYS if k in stats[n]})
            self._epoch_payloads(trainer, stats, values)
        metrics["spectral/time_s"] = time.perf_counter() - t0
        log_scalars(trainer, metrics)

    def _record_trend(self, step: int, stats: dict[str, dict[str, float]]) -> None:
        self.trend[int(step)] = {n: {k: st[k] for k in TREND_STATS if k in st} for n, st in stats.items()}
        if len(self.trend) > _MAX_TREND_POINTS:
            steps = sorted(self.trend)
            for old in steps[:-1][::2]:  # thin the history, keep the latest
                del self.trend[old]

    @torch.no_grad()
    def _padded_norms(self, stats: dict[str, dict[str, float]]) -> None:
        """``sigma_max_padded`` of every zero-padded conv (the real operator), warm-started."""
        for name, module in self.layers:
            if not isinstance(module, CONV_TYPES) or module.padding_mode != "zeros" or name not in stats:
                continue
            w = module.weight.detach()  # the effective kernel (pruned / parametrized included)
            if not torch.isfinite(w).all():
                continue
            dtype = self.dtype or (torch.float64 if w.dtype == torch.float64 else torch.float32)
            sigma, v, _ = padded_conv_norm(
                w.to(dtype), self.input_sizes[name], stride=module.stride, padding=module.padding,
                dilation=module.dilation, groups=module.groups, start=self._padded_start.get(name),
            )  # fmt: skip
            self._padded_start[name] = v
            stats[name]["sigma_max_padded"] = sigma

    def _epoch_payloads(
        self, trainer: pl.Trainer, stats: dict[str, dict[str, float]], values: dict[str, torch.Tensor]
    ) -> None:
        from lightning_struct.viz.spectra import downsample_sorted

        epoch = trainer.current_epoch
        for name, v in values.items():
            kept = self.history.setdefault(name, {})
            kept[f"epoch {epoch}"] = downsample_sorted(v)
            while len(kept) > _MAX_EPOCH_LINES:  # keep the first epoch and the latest ones
                del kept[list(kept)[1]]
        self.stats_history[epoch] = {name: dict(st) for name, st in stats.items()}
        out = Path(_run_dir(trainer)) / "spectra"
        figures: dict[str, Path] = {}
        if self.plot and values:
            figures = self._plots(out, epoch, values)
        try:
            write_summary(out / "summary.json", self.stats_history, self.input_sizes, self.block_bounds)
        except OSError as err:
            log.warning("SpectralMonitor: could not write %s: %s", out / "summary.json", err)
        if not wandb_loggers(trainer):
            return
        histograms = bool(self.histogram_every_n_epochs) and (epoch + 1) % self.histogram_every_n_epochs == 0
        log_wandb(trainer, wandb_payload(stats, values, self.history, self.trend, self.input_sizes, figures,
                                         self.histogram_bins if histograms else 0))  # fmt: skip

    def _plots(self, out: Path, epoch: int, values: dict[str, torch.Tensor]) -> dict[str, Path]:
        from lightning_struct.viz.spectra import plot_spectra, plot_spectra_over_time, plot_stat_heatmaps

        figures: dict[str, Path] = {}
        jobs = {
            "plot": lambda: plot_spectra(values, out / f"epoch_{epoch:03d}.png",
                                         title=f"layer spectra (periodic boundary), epoch {epoch}"),
            "heatmap": lambda: plot_stat_heatmaps(self.stats_history, out / "heatmap.png",
                                                  title=f"per-layer statistics, epochs {min(self.stats_history)}-{epoch}"),
            "over_time": lambda: plot_spectra_over_time(self.history, out / "over_time.png",
                                                        title=f"how each layer's spectrum moves, epochs {min(self.stats_history)}-{epoch}"),
        }  # fmt: skip
        for key, job in jobs.items():
            try:
                figures[key] = job()
            except Exception as err:  # a plot must never stop training
                log.warning("SpectralMonitor: %s plot failed: %s", key, err)
        self.last_plot = figures.get("plot")
        return figures

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.last_stats:
            return
        final = {f"spectral_final/{name}/{key}": val for name, st in self.last_stats.items() for key, val in st.items()}
        for lg in wandb_loggers(trainer):
            try:
                lg.experiment.summary.update(final)
            except Exception as err:  # the summary is a convenience; never fail the run for it
                log.warning("SpectralMonitor: W&B summary update failed: %s", err)

    # ----------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step_logged": self._last_step_logged,
            "last_clip_step": self._last_clip_step,
            "input_sizes": {k: list(v) for k, v in self.input_sizes.items()},
            # the over-time views continue after a resume (small: statistics and 256-point spectra)
            "stats_history": {int(e): h for e, h in self.stats_history.items()},
            "trend": {int(t): h for t, h in self.trend.items()},
            "history": {n: {k: [float(x) for x in v] for k, v in h.items()} for n, h in self.history.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # older checkpoints also hold "epochs_done": the epoch schedule follows trainer.current_epoch
        self._last_step_logged = int(state_dict.get("last_step_logged", -1))
        self._last_clip_step = int(state_dict.get("last_clip_step", -1))
        self.input_sizes.update({k: tuple(v) for k, v in state_dict.get("input_sizes", {}).items()})
        self.stats_history.update({int(e): dict(h) for e, h in state_dict.get("stats_history", {}).items()})
        self.trend.update({int(t): dict(h) for t, h in state_dict.get("trend", {}).items()})
        for name, h in state_dict.get("history", {}).items():
            self.history.setdefault(name, {}).update({k: np.asarray(v, dtype=np.float64) for k, v in h.items()})


def _bn_scale(bn: nn.Module) -> float:
    """Lipschitz constant of an eval-mode BatchNorm: ``max |gamma| / sqrt(running_var + eps)``."""
    var = getattr(bn, "running_var", None)
    if var is None:
        return math.nan
    gamma = bn.weight.detach().abs() if getattr(bn, "weight", None) is not None else torch.ones_like(var)
    return float((gamma / torch.sqrt(var.detach() + bn.eps)).max())


def residual_block_bounds(model: nn.Module, stats: dict[str, dict[str, float]]) -> dict[str, float]:
    """Upper bounds of the Lipschitz constants of the residual blocks whose convs were all measured.

    A block computes ``relu(shortcut(x) + bn_k(conv_k(... relu(bn_1(conv_1(x))))))``: its bound is
    ``L(shortcut) + prod_i sigma_max(conv_i) * scale(bn_i)``; the shortcut is the identity / a
    parameter-free subsample (1) or a conv + BatchNorm (``sigma_max * scale``).
    """
    out: dict[str, float] = {}
    if model is None:
        return out
    for name, block in model.named_modules():
        convs = [k for k in ("conv1", "conv2", "conv3") if isinstance(getattr(block, k, None), nn.Conv2d)]
        bns = [k.replace("conv", "bn") for k in convs]
        if len(convs) < 2 or not all(isinstance(getattr(block, b, None), nn.BatchNorm2d) for b in bns):
            continue
        attr = "downsample" if getattr(block, "downsample", None) is not None else "shortcut"
        short = getattr(block, attr, None)
        prefix = f"{name}." if name else ""
        names = [prefix + c for c in convs]
        if not all(n in stats for n in names):
            continue
        branch = 1.0
        for n, b in zip(names, bns):
            branch *= stats[n].get("sigma_max", math.nan) * _bn_scale(getattr(block, b))
        shortcut = 1.0
        if isinstance(short, nn.Sequential) and len(short) and isinstance(short[0], nn.Conv2d):
            sname = f"{prefix}{attr}.0"
            if sname not in stats:
                continue
            shortcut = stats[sname].get("sigma_max", math.nan) * (_bn_scale(short[1]) if len(short) > 1 else 1.0)
        out[name] = shortcut + branch
    return out


def write_summary(
    path: Path, stats_history: dict[int, dict[str, dict[str, float]]], input_sizes: dict[str, tuple[int, ...]],
    block_bounds: dict[str, float],
) -> Path:
    """``summary.json``: the last and every epoch's per-layer statistics (NaN/inf as strings)."""
    import json

    from lightning_struct.loggers import json_safe

    last = stats_history[max(stats_history)] if stats_history else {}
    data = json_safe({
        "boundary": "periodic",
        "input_sizes": input_sizes,
        "final_epoch": max(stats_history) if stats_history else None,
        "final": last,
        "block_lipschitz_bounds": block_bounds,
        "epochs": stats_history,
    })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def wandb_payload(
    stats: dict[str, dict[str, float]], values: dict[str, torch.Tensor], history: dict[str, dict[str, np.ndarray]],
    trend: dict[int, dict[str, dict[str, float]]], input_sizes: dict[str, tuple[int, ...]],
    figures: dict[str, Path], histogram_bins: int,
) -> dict[str, Any]:
    """The epoch-end W&B payload (``histogram_bins=0``: no histograms this time). ``trend``:
    ``{step: {layer: {stat: value}}}`` of every pass so far, drawn as one chart per stat and stage."""
    import wandb

    from lightning_struct.viz.spectra import panel_groups, wandb_histogram, wandb_spectrum_lines

    payload: dict[str, Any] = {}
    for name, v in values.items():
        if histogram_bins:
            payload[f"spectral_hist/{name}"] = wandb_histogram(v, histogram_bins)
        if name in history:
            payload[f"spectral_lines/{name}"] = wandb_spectrum_lines(history[name], f"sorted spectrum of {name}")
    columns = ["layer", "input_size", *SPECTRUM_STATS, *ESD_KEYS]
    rows = [
        [name, "x".join(map(str, input_sizes.get(name, ()))) or "-", *(st.get(k, math.nan) for k in columns[2:])]
        for name, st in stats.items()
    ]
    payload["spectral/table"] = wandb.Table(columns=columns, data=rows)
    steps = sorted(trend)
    # at most 12 stages: the deepest name prefix that fits
    stages = dict(panel_groups(list(stats), 12, min_panels=13)) if len(stats) > 12 else {"all layers": list(stats)}
    for stat in TREND_STATS:
        for stage, members in stages.items():
            ys = [[float(trend[t].get(n, {}).get(stat, math.nan)) for t in steps] for n in members]
            if all(math.isnan(v) for y in ys for v in y):
                continue  # e.g. the condition number under step_stats="norm" before the first full pass
            payload[f"spectral_trends/{stat} {stage}"] = wandb.plot.line_series(
                xs=[float(t) for t in steps], ys=ys, keys=members, title=f"{stat} per layer, {stage}", xname="step"
            )
    for key, fig in figures.items():
        payload[f"spectral/{key}"] = wandb.Image(str(fig))
    return payload


def payload_bytes(payload: dict[str, Any]) -> int:
    """An upper estimate of what a W&B payload sends: image files, table/chart data as JSON, histograms."""
    import json
    import os

    total = 0
    for value in payload.values():
        path = getattr(value, "_path", None)
        if path and os.path.isfile(path):
            total += os.path.getsize(path)
            continue
        table = getattr(value, "table", value)
        data = getattr(table, "data", None)
        if data is not None:
            total += len(json.dumps(data, default=str))
            continue
        hist = getattr(value, "histogram", None)
        if hist is not None:
            total += 16 * (len(hist) + 1)
            continue
        total += len(json.dumps(value, default=str))
    return total


def layer_esd(module: nn.Module | None, values: torch.Tensor) -> dict[str, float]:
    """``alpha``, ``alpha_weighted``, ``log_spectral_norm`` of the exact operator spectrum (the
    zero tolerance uses the per-frequency block size, not the whole operator's)."""
    from lightning_struct.ops.esd import esd_stats

    dim = None
    if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
        w = module.weight
        if w.dim() > 2:
            stride = math.prod(getattr(module, "stride", (1,)))
            groups = int(getattr(module, "groups", 1))
            dim = max(w.shape[0] // groups, stride * w.shape[1])
        else:
            dim = max(w.shape)
    try:
        out = esd_stats(values, matrix_dim=dim)
    except Exception as err:  # a statistic must never stop training
        log.warning("SpectralMonitor: ESD fit failed: %s", err)
        return {}
    return {k: float(out[k]) for k in ESD_KEYS}
