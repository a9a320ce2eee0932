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
from torch import nn

from lightning_struct.callbacks._log import log_scalars, log_wandb, wandb_loggers
from lightning_struct.ops.spectral import clip_conv_operator_norm, module_spectral_norm, module_spectrum
from lightning_struct.select import InputSizeRecorder, resolve_types, select_layers, weight_parameter

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_TYPES: tuple[type, ...] = (*_CONVS, nn.Linear)
STATS = ("sigma_max", "sigma_min", "condition_number", "stable_rank", "effective_rank")


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
        spectral/lipschitz_bound           product of the layers' sigma_max
        spectral/time_s                    wall time of this monitoring pass

    ``spectral/lipschitz_bound`` is the product over the *selected* layers: an upper bound on the
    network's Lipschitz constant for a plain chain of those layers with 1-Lipschitz activations;
    normalisation layers and residual branches are not accounted for.

    At epoch end it also draws all layers' sorted spectra into
    ``<run dir>/spectra/epoch_<NNN>.png`` and, when a ``WandbLogger`` is present, logs per layer a
    ``wandb.Histogram`` of the singular values (``spectral_hist/<layer>``), a line chart of the sorted
    spectrum at each epoch so far (``spectral_lines/<layer>``), one table of every layer's
    statistics (``spectral/table``) and the PNG (``spectral/plot``).

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
        max_norm: clip conv operator norms to this value (``None``: no clipping).
        clip_every_n_steps: clipping period in optimizer steps (required with ``max_norm``).
        clip_n_iter: alternating projections per clipping.
        dtype: compute dtype of the spectra (``None``: float32 for float32 weights, float64 for float64).
        method: full-spectrum method of :func:`lightning_struct.ops.spectral.conv_spectrum`:
            ``"svd"`` (default; small singular values, ``sigma_min`` and the condition number
            accurate to ~1e-7 sigma_max in float32), ``"gram"`` (about 2x faster; singular values
            below ~1e-3 sigma_max are only resolved to that floor in float32) or ``"auto"``.

    Raises:
        ValueError: for a bad argument (named in the message), at construction time.
    """

    def __init__(
        self,
        every_n_steps: int | None = 200,
        step_stats: Literal["full", "norm"] = "full",
        full_every_n_epochs: int | None = 1,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: Sequence[type | str] | None = None,
        on_unsupported: Literal["raise", "skip"] = "raise",
        plot: bool = True,
        histogram_bins: int = 64,
        max_norm: float | None = None,
        clip_every_n_steps: int | None = None,
        clip_n_iter: int = 1,
        dtype: torch.dtype | None = None,
        method: Literal["auto", "gram", "svd"] = "svd",
    ) -> None:
        super().__init__()
        if method not in ("auto", "gram", "svd"):
            raise ValueError(f"SpectralMonitor: method={method!r}; allowed: 'auto', 'gram', 'svd'")
        for key, value in (("every_n_steps", every_n_steps), ("full_every_n_epochs", full_every_n_epochs)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"SpectralMonitor: {key}={value!r}; allowed: a non-negative int or None")
        if step_stats not in ("full", "norm"):
            raise ValueError(f"SpectralMonitor: step_stats={step_stats!r}; allowed: 'full', 'norm'")
        if on_unsupported not in ("raise", "skip"):
            raise ValueError(f"SpectralMonitor: on_unsupported={on_unsupported!r}; allowed: 'raise', 'skip'")
        if not 1 <= int(histogram_bins) <= 512:
            raise ValueError(f"SpectralMonitor: histogram_bins={histogram_bins}; allowed: 1..512 (W&B limit)")
        if max_norm is not None:
            if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
                raise ValueError(f"SpectralMonitor: max_norm={max_norm!r}; allowed: a positive float or None")
            if not isinstance(clip_every_n_steps, int) or clip_every_n_steps < 1:
                raise ValueError(
                    f"SpectralMonitor: clip_every_n_steps={clip_every_n_steps!r}; a positive int is required with max_norm"
                )
        if int(clip_n_iter) < 1:
            raise ValueError(f"SpectralMonitor: clip_n_iter={clip_n_iter}; allowed: >= 1")
        self.every_n_steps = every_n_steps or 0
        self.step_stats = step_stats
        self.full_every_n_epochs = full_every_n_epochs or 0
        self.include = include
        self.exclude = exclude
        self.types = resolve_types(types, DEFAULT_TYPES)
        unsupported = [t.__name__ for t in self.types if not issubclass(t, DEFAULT_TYPES)]
        if unsupported:
            raise ValueError(f"SpectralMonitor: types {unsupported} are not supported; allowed: Conv1d/2d/3d, Linear")
        self.on_unsupported = on_unsupported
        self.plot = plot
        self.histogram_bins = int(histogram_bins)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.clip_every_n_steps = clip_every_n_steps
        self.clip_n_iter = int(clip_n_iter)
        self.dtype = dtype
        self.method = method

        self.layers: list[tuple[str, nn.Module]] = []
        self.input_sizes: dict[str, tuple[int, ...]] = {}
        self._recorder: InputSizeRecorder | None = None
        # schedule state (saved in checkpoints)
        self._last_step_logged = -1
        self._last_clip_step = -1
        self._epochs_done = 0
        #: per layer: {"epoch <e>": downsampled sorted spectrum} for the W&B line charts
        self.history: dict[str, dict[str, np.ndarray]] = {}
        #: the statistics of the last pass, {layer: {stat: value}}
        self.last_stats: dict[str, dict[str, float]] = {}
        self.last_plot: Path | None = None

    # ----------------------------------------------------------------------------- setup
    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layers = select_layers(
            pl_module,
            self.types,
            self.include,
            self.exclude,
            on_unsupported=self.on_unsupported,
            supported=DEFAULT_TYPES,
            what="SpectralMonitor",
        )
        if not self.layers:
            log.warning("SpectralMonitor: no layer of %s selected; nothing will be logged", [t.__name__ for t in self.types])
        missing = [(n, m) for n, m in self.layers if n not in self.input_sizes and isinstance(m, _CONVS)]
        for n, m in self.layers:
            if isinstance(m, nn.Linear):
                self.input_sizes[n] = ()
        if missing and self._recorder is None:
            self._recorder = InputSizeRecorder(missing).attach()

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

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs_done = trainer.current_epoch + 1
        if not self.full_every_n_epochs or self._epochs_done % self.full_every_n_epochs:
            return
        if not self._collect_sizes() or not trainer.is_global_zero:
            return
        self._pass(trainer, full=True, epoch_end=True)

    # ----------------------------------------------------------------------------- work
    @torch.no_grad()
    def _clip(self) -> None:
        for name, module in self.layers:
            if not isinstance(module, _CONVS):
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

    @torch.no_grad()
    def compute(self, full: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
        """Statistics (and, with ``full``, all singular values) of every selected layer now."""
        stats: dict[str, dict[str, float]] = {}
        values: dict[str, torch.Tensor] = {}
        for name, module in self.layers:
            weight = module.weight.detach()
            if not torch.isfinite(weight).all():
                log.warning("SpectralMonitor: layer %r has NaN/inf weights; its statistics are logged as NaN", name)
                stats[name] = {k: math.nan for k in (STATS if full else ("sigma_max",))}
                continue
            size = self.input_sizes.get(name) or None
            if full:
                spec = module_spectrum(module, size, method=self.method, dtype=self.dtype, weight=weight, name=name)
                stats[name] = spec.stats()
                values[name] = spec.values()
            else:
                stats[name] = {"sigma_max": float(module_spectral_norm(module, size, dtype=self.dtype, weight=weight, name=name))}
        return stats, values

    def _pass(self, trainer: pl.Trainer, full: bool, epoch_end: bool) -> None:
        t0 = time.perf_counter()
        try:
            stats, values = self.compute(full=full)
        except Exception as err:  # monitoring must never stop training
            log.warning("SpectralMonitor: spectra failed at step %d: %s", trainer.global_step, err)
            return
        self.last_stats = stats
        metrics: dict[str, float] = {}
        lipschitz = 1.0
        for name, st in stats.items():
            for key, val in st.items():
                metrics[f"spectral/{name}/{key}"] = val
            lipschitz *= st.get("sigma_max", math.nan)
        if stats:
            metrics["spectral/lipschitz_bound"] = lipschitz
        if epoch_end:
            self._epoch_payloads(trainer, stats, values)
        metrics["spectral/time_s"] = time.perf_counter() - t0
        log_scalars(trainer, metrics)

    def _epoch_payloads(
        self, trainer: pl.Trainer, stats: dict[str, dict[str, float]], values: dict[str, torch.Tensor]
    ) -> None:
        from lightning_struct.viz.spectra import downsample_sorted, plot_spectra

        epoch = trainer.current_epoch
        for name, v in values.items():
            self.history.setdefault(name, {})[f"epoch {epoch}"] = downsample_sorted(v)
        if self.plot and values:
            run_dir = Path(trainer.log_dir or trainer.default_root_dir)
            try:
                self.last_plot = plot_spectra(
                    values, run_dir / "spectra" / f"epoch_{epoch:03d}.png", title=f"layer spectra (periodic boundary), epoch {epoch}"
                )
            except Exception as err:
                log.warning("SpectralMonitor: plot failed: %s", err)
        if not wandb_loggers(trainer):
            return
        import wandb

        from lightning_struct.viz.spectra import wandb_histogram, wandb_spectrum_lines

        payload: dict[str, Any] = {}
        for name, v in values.items():
            payload[f"spectral_hist/{name}"] = wandb_histogram(v, self.histogram_bins)
            payload[f"spectral_lines/{name}"] = wandb_spectrum_lines(self.history[name], f"sorted spectrum of {name}")
        columns = ["layer", "input_size", *STATS, "reshape_bound"]
        rows = [
            [name, "x".join(map(str, self.input_sizes.get(name, ()))) or "-", *(st.get(k, math.nan) for k in columns[2:])]
            for name, st in stats.items()
        ]
        payload["spectral/table"] = wandb.Table(columns=columns, data=rows)
        if self.last_plot is not None:
            payload["spectral/plot"] = wandb.Image(str(self.last_plot))
        log_wandb(trainer, payload)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step_logged": self._last_step_logged,
            "last_clip_step": self._last_clip_step,
            "epochs_done": self._epochs_done,
            "input_sizes": {k: list(v) for k, v in self.input_sizes.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step_logged = int(state_dict.get("last_step_logged", -1))
        self._last_clip_step = int(state_dict.get("last_clip_step", -1))
        self._epochs_done = int(state_dict.get("epochs_done", 0))
        self.input_sizes.update({k: tuple(v) for k, v in state_dict.get("input_sizes", {}).items()})
