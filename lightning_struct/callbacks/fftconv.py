"""FFTConvolution
^^^^^^^^^^^^^^

Per-layer autotuned FFT convolution (Mathieu, Henaff & LeCun, "Fast Training of Convolutional
Networks through FFTs", ICLR 2014): an FFT convolution wins only for large kernels and maps, so
the callback *measures* every selected convolution on its real input shape and swaps it for an
:class:`~lightning_struct.nn.FFTConv2d` only where that is faster by a margin.

The story of the callback:

* **which hook**: ``on_train_start`` for ``fit`` (the train dataloader exists there; the
  sanity check before it runs the direct convs, which compute the same numbers), and
  ``on_validation_start`` / ``on_test_start`` / ``on_predict_start`` for the ``validate`` /
  ``test`` / ``predict`` entry points. Each decision starts from the direct layers (earlier swaps
  are reverted first), so ``fit`` then ``test`` re-decides for forward-only use;
* **which layers**: ``nn.Conv1d`` / ``nn.Conv2d`` picked by ``include`` / ``exclude`` name globs
  (:func:`lightning_struct.select.select_layers`), or an explicit list of layer names as
  ``policy``; layers that cannot be swapped (parametrized weights, subclasses with their own
  forward) raise, or are skipped with a warning under ``on_unsupported="skip"``;
* **which op**: the input shape of every selected layer comes from forward hooks during one dry
  forward of a real batch (eval mode, so BatchNorm statistics do not move; the global RNG state
  is restored afterwards, so the run's data order is unchanged) or from ``input_shapes``;
  :func:`lightning_struct.nn.fftconv.time_direct_vs_fft` times direct vs FFT on that shape
  (forward + backward for ``fit``, forward only otherwise; under the Trainer's precision
  context); ``policy="auto"`` swaps where ``fft_time * margin <= direct_time``. The swap keeps
  the same Parameter objects (:meth:`FFTConv2d.from_conv`), so optimizers, DDP and checkpoints
  are untouched. Under DDP, rank 0 measures and decides and ``trainer.strategy.broadcast`` hands
  the decisions to every rank, so all ranks run the same layers;
* **what is logged** (rank zero): per layer ``fftconv/<layer>/direct_ms``, ``.../fft_ms``,
  ``.../use_fft`` and the number of swapped layers; a ``fftconv/decisions`` W&B table when a
  ``WandbLogger`` is present; one info line per layer; everything also in
  :attr:`FFTConvolution.decisions`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, default_collate
from typing_extensions import override

from lightning_struct._checks import check_bool, check_choice, check_globs, check_int, check_number, is_int
from lightning_struct.callbacks._batches import first_loader, preserved_rng
from lightning_struct.callbacks._log import log_scalars, log_table
from lightning_struct.callbacks._structure import announce_structure_change
from lightning_struct.nn.fftconv import FFTConvNd, fft_module_for, time_direct_vs_fft, unsupported_reason
from lightning_struct.nn.utils import eval_mode, set_submodule
from lightning_struct.select import select_layers

log = logging.getLogger(__name__)

__all__ = ["FFTConvolution", "FFTDecision", "POLICIES", "STAGES"]

POLICIES: tuple[str, ...] = ("auto", "always")
STAGES: tuple[str, ...] = ("fit", "validate", "test", "predict")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


@dataclass
class FFTDecision:
    """What the callback decided for one layer at one stage.

    ``direct_ms`` / ``fft_ms`` are the fastest timed call in milliseconds (summed over the calls of
    the layer in one forward), ``nan`` when nothing was timed (``policy="always"``/list, or the
    layer did not run in the dry forward).
    """

    layer: str
    stage: str
    use_fft: bool
    input_shapes: list[tuple[int, ...]]
    direct_ms: float = math.nan
    fft_ms: float = math.nan
    reason: str = ""

    @property
    def speedup(self) -> float:
        """``direct_ms / fft_ms`` (``nan`` when not timed)."""
        return self.direct_ms / self.fft_ms if self.fft_ms > 0 else math.nan


def _first_batch(loader: DataLoader) -> Any:
    """One batch of ``loader``'s size built from its dataset and collate function.

    The loader itself is not iterated: the Trainer's loaders carry sampler wrappers whose
    iterator state is shared (iterating them here would eat a batch of the real loop).
    """
    size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if not is_int(size) or size < 1:
        raise RuntimeError(
            "FFTConvolution: cannot tell the dataloader's batch size; pass input_shapes={layer: shape}"
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        samples = list(itertools.islice(iter(dataset), size))
    else:
        samples = [dataset[i] for i in range(min(size, len(dataset)))]  # type: ignore[arg-type]
    if not samples:
        raise RuntimeError(
            "FFTConvolution: the dataloader's dataset is empty; pass input_shapes={layer: shape}"
        )
    collate = loader.collate_fn or default_collate
    return collate(samples)


def _default_input(batch: Any) -> Any:
    """The model input of a batch: first element of a tuple/list, ``"image"``/``"input"``/``"x"`` of a dict."""
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("image", "images", "input", "inputs", "x"):
            if key in batch:
                return batch[key]
    return batch


class FFTConvolution(Callback):
    """Swap convolutions for exact FFT convolutions where that is measured to be faster.

    Args:
        policy: ``"auto"`` (time each selected layer, swap where FFT wins by ``margin``),
            ``"always"`` (swap every selected layer, no timing) or a list of exact layer names to
            swap (no timing; ``include``/``exclude`` must then be ``None``).
        include: name globs of candidate layers (``None``: every Conv1d/Conv2d).
        exclude: name globs removed from the candidates.
        margin: ``>= 1``; FFT is chosen when ``fft_time * margin <= direct_time``.
        repeats: timed calls per version and layer (the fastest is used); ``warmup`` untimed calls
            come first.
        revert_on_end: swap back to the direct layers at the end of each stage.
        stages: the Trainer entry points at which to decide (default all four).
        cache_spectrum: FFT layers cache their kernel spectrum in eval mode.
        input_fn: maps a batch to the model input for the dry forward (default: first element of
            a tuple/list batch, ``batch["image"|"input"|"x"]`` for dicts, else the batch).
        input_shapes: ``{layer name: input shape}`` to skip the dry forward (e.g. for models
            whose forward does not take the batch input).
        on_unsupported: ``"raise"`` (default) or ``"skip"`` for selected layers that cannot be
            swapped.

    Example::

        trainer = Trainer(callbacks=[FFTConvolution(margin=1.1)])
        trainer.fit(model, datamodule=dm)
        cb.decisions  # per layer: input shapes, direct_ms, fft_ms, use_fft
    """

    def __init__(
        self,
        policy: str | Sequence[str] = "auto",
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        margin: float = 1.1,
        repeats: int = 5,
        warmup: int = 1,
        revert_on_end: bool = False,
        stages: Sequence[str] = STAGES,
        cache_spectrum: bool = True,
        input_fn: Callable[[Any], Any] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        on_unsupported: str = "raise",
    ) -> None:
        super().__init__()
        where = "FFTConvolution"
        if isinstance(policy, str):
            if policy not in POLICIES:  # not check_choice: a list of names is allowed too
                raise ValueError(
                    f"{where}: policy={policy!r}; allowed: 'auto', 'always' or a list of layer names"
                )
            self.layer_names: list[str] | None = None
        else:
            if not isinstance(policy, Sequence) or not policy or not all(isinstance(p, str) for p in policy):
                raise TypeError(
                    f"FFTConvolution: policy must be 'auto', 'always' or a non-empty list of layer names, got {policy!r}"
                )
            if include is not None or exclude is not None:
                raise ValueError(
                    "FFTConvolution: a list `policy` names the layers itself; leave include/exclude None"
                )
            self.layer_names = [str(p) for p in policy]
            policy = "list"
        check_globs(include, "include", where)
        check_globs(exclude, "exclude", where)
        check_number(margin, "margin", where, minimum=1.0)  # FFT must win by it
        check_int(repeats, "repeats", where, minimum=1)
        check_int(warmup, "warmup", where, minimum=0)
        if isinstance(stages, str):
            stages = [stages]
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages:
            raise ValueError(
                f"{where}: stages={list(stages)!r}; allowed: a non-empty subset of {list(STAGES)}"
            )
        check_choice(on_unsupported, "on_unsupported", ("raise", "skip"), where)
        if input_fn is not None and not callable(input_fn):
            raise TypeError(f"{where}: input_fn must be callable, got {input_fn!r}")
        check_bool(revert_on_end, "revert_on_end", where)
        check_bool(cache_spectrum, "cache_spectrum", where)
        self.policy = policy
        self.include = include
        self.exclude = exclude
        self.margin = float(margin)
        self.repeats = repeats
        self.warmup = warmup
        self.revert_on_end = revert_on_end
        self.stages = tuple(stages)
        self.cache_spectrum = cache_spectrum
        self.input_fn = input_fn or _default_input
        self.input_shapes = {k: tuple(int(v) for v in s) for k, s in (input_shapes or {}).items()}
        self.on_unsupported = on_unsupported
        #: decisions of the latest stage (one per candidate layer)
        self.decisions: list[FFTDecision] = []
        #: names of the layers currently swapped by this callback
        self.swapped: list[str] = []
        #: wall seconds the latest decision took (timing included)
        self.decision_seconds: float = 0.0
        self._model: nn.Module | None = None

    def __repr__(self) -> str:
        return (
            f"FFTConvolution(policy={self.policy if self.layer_names is None else self.layer_names!r}, "
            f"margin={self.margin}, swapped={len(self.swapped)})"
        )

    # ------------------------------------------------------------------ selection
    def candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The Conv1d/Conv2d layers this callback considers (unsupported ones skipped or raised)."""
        include: str | Sequence[str] | None = (
            self.layer_names if self.layer_names is not None else self.include
        )
        chosen = select_layers(
            model,
            _CONV_TYPES,
            include,
            self.exclude,
            on_unsupported=self.on_unsupported,  # type: ignore[arg-type]
            what="FFTConvolution",
        )
        out: list[tuple[str, nn.Module]] = []
        for name, module in chosen:
            reason = unsupported_reason(module)
            if reason is not None:
                msg = f"FFTConvolution: layer {name!r} cannot become an FFT convolution: {reason}"
                if self.on_unsupported == "raise":
                    raise ValueError(msg + " (exclude it or pass on_unsupported='skip')")
                log.warning(msg + "; left as is")
                continue
            out.append((name, module))
        return out

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "fit" in self.stages:
            self._decide(trainer, pl_module, "fit")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and "validate" in self.stages:
            self._decide(trainer, pl_module, "validate")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._decide(trainer, pl_module, "test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "predict" in self.stages:
            self._decide(trainer, pl_module, "predict")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.revert_on_end:
            announce_structure_change(trainer, pl_module, self.revert(pl_module))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.revert_on_end and trainer.state.fn == "validate":
            self.revert(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.revert_on_end:
            self.revert(pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.revert_on_end:
            self.revert(pl_module)

    # ------------------------------------------------------------------ swapping
    def revert(self, model: nn.Module | None = None) -> list[str]:
        """Swap every layer this callback made FFT back to its direct class (same Parameters).

        Returns the names of the reverted layers.
        """
        model = model if model is not None else self._model
        if model is None:
            return []
        reverted = []
        for name in self.swapped:
            try:
                module = model.get_submodule(name)
            except AttributeError:  # the model changed structure since the swap
                continue
            if isinstance(module, FFTConvNd):
                set_submodule(model, name, module.to_conv())
                reverted.append(name)
        self.swapped = []
        return reverted

    def apply(self, model: nn.Module, decisions: Sequence[FFTDecision]) -> None:
        """Swap the layers of ``decisions`` that use FFT (the others are made direct)."""
        for d in decisions:
            module = model.get_submodule(d.layer)
            is_fft = isinstance(module, FFTConvNd)
            if d.use_fft and not is_fft:
                set_submodule(model, d.layer, fft_module_for(module, cache_spectrum=self.cache_spectrum))
            elif not d.use_fft and is_fft:
                set_submodule(model, d.layer, module.to_conv())  # type: ignore[union-attr]
        self.swapped = [d.layer for d in decisions if d.use_fft]
        self._model = model

    # ------------------------------------------------------------------ deciding
    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        t0 = time.perf_counter()
        held = {name: id(m) for name, m in pl_module.named_modules()}
        if self._model is pl_module:
            self.revert(pl_module)  # decide from the direct layers
        self.swapped = []
        candidates = self.candidates(pl_module)
        if self.policy != "auto":
            why = "policy=always" if self.policy == "always" else "named in policy"
            decisions = [FFTDecision(name, stage, True, [], reason=why) for name, _ in candidates]
        else:
            decisions = None
            if trainer.is_global_zero:
                decisions = self._measure(trainer, pl_module, stage, candidates)
            decisions = trainer.strategy.broadcast(decisions, src=0)
        self.apply(pl_module, decisions)
        announce_structure_change(
            trainer, pl_module, [d.layer for d in decisions if id(pl_module.get_submodule(d.layer)) != held.get(d.layer)]
        )
        self.decisions = list(decisions)
        self.decision_seconds = time.perf_counter() - t0
        self._log(trainer, stage)

    def _measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: str,
        candidates: list[tuple[str, nn.Module]],
    ) -> list[FFTDecision]:
        train = stage == "fit"
        calls = self._input_shapes(trainer, pl_module, stage, candidates)
        ctx = self._precision_context(trainer)
        decisions = []
        for name, module in candidates:
            seen = calls.get(name, [])
            if not seen:
                decisions.append(FFTDecision(name, stage, False, [], reason="not called in the dry forward"))
                continue
            direct_s = fft_s = 0.0
            for shape, dtype, requires_grad in seen:
                t = time_direct_vs_fft(
                    module,
                    shape,
                    train=train,
                    input_requires_grad=requires_grad,
                    dtype=dtype,
                    repeats=self.repeats,
                    warmup=self.warmup,
                    context=ctx,
                )
                direct_s += t.direct_s
                fft_s += t.fft_s
            use = fft_s * self.margin <= direct_s
            reason = f"fft {'faster' if use else 'not faster'} by margin {self.margin:g} ({'fwd+bwd' if train else 'fwd'})"
            decisions.append(
                FFTDecision(name, stage, use, [s for s, _, _ in seen], direct_s * 1e3, fft_s * 1e3, reason)
            )
        return decisions

    @staticmethod
    def _precision_context(trainer: pl.Trainer) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        plugin = getattr(trainer, "precision_plugin", None)
        if plugin is None or not hasattr(plugin, "forward_context"):
            return contextlib.nullcontext
        return plugin.forward_context

    def _input_shapes(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: str,
        candidates: list[tuple[str, nn.Module]],
    ) -> dict[str, list[tuple[tuple[int, ...], torch.dtype, bool]]]:
        """``{layer: [(input shape, dtype, input requires grad), ...]}`` for every call of each
        candidate in one dry forward (or from ``input_shapes``)."""
        names = {n for n, _ in candidates}
        if self.input_shapes:
            dtype = next((p.dtype for p in pl_module.parameters()), torch.float32)
            missing = sorted(names - set(self.input_shapes))
            if missing:
                raise ValueError(f"FFTConvolution: input_shapes has no entry for layers {missing}")
            return {n: [(self.input_shapes[n], dtype, True)] for n in names}
        example = self._example_input(trainer, pl_module, stage)
        seen: dict[str, list[tuple[tuple[int, ...], torch.dtype, bool]]] = {n: [] for n in names}
        handles = []
        for name, module in candidates:

            def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0] if args else None
                if isinstance(x, torch.Tensor):
                    seen[name].append((tuple(x.shape), x.dtype, bool(x.requires_grad)))

            handles.append(module.register_forward_pre_hook(hook))
        grad = torch.enable_grad() if stage == "fit" else torch.no_grad()
        try:
            with eval_mode(pl_module), grad, self._precision_context(trainer)():
                pl_module(example)
        except Exception as err:
            raise RuntimeError(
                f"FFTConvolution: the dry forward pl_module(input_fn(batch)) that finds the layers' input "
                f"shapes failed ({type(err).__name__}: {err}); pass input_fn=<batch -> model input> or "
                "input_shapes={layer: shape}"
            ) from err
        finally:
            for h in handles:
                h.remove()
        return seen

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
        source = {
            "fit": lambda: trainer.train_dataloader,
            "validate": lambda: trainer.val_dataloaders,
            "test": lambda: trainer.test_dataloaders,
            "predict": lambda: trainer.predict_dataloaders,
        }[stage]()
        loader = first_loader(source, DataLoader)
        if loader is not None:
            with preserved_rng():
                batch = _first_batch(loader)
            batch = trainer.strategy.batch_to_device(batch, pl_module.device)
            return self.input_fn(batch)
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            return trainer.strategy.batch_to_device(example, pl_module.device)
        raise RuntimeError(
            f"FFTConvolution: no {stage} dataloader and no `example_input_array` to learn the layers' "
            "input shapes from; pass input_shapes={layer: shape} or set pl_module.example_input_array"
        )

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: pl.Trainer, stage: str) -> None:
        metrics: dict[str, float] = {"fftconv/swapped_layers": float(len(self.swapped))}
        rows = []
        for d in self.decisions:
            metrics[f"fftconv/{d.layer}/use_fft"] = float(d.use_fft)
            if not math.isnan(d.direct_ms):
                metrics[f"fftconv/{d.layer}/direct_ms"] = d.direct_ms
                metrics[f"fftconv/{d.layer}/fft_ms"] = d.fft_ms
            shapes = ";".join("x".join(map(str, s)) for s in d.input_shapes)
            rows.append([stage, d.layer, shapes, d.direct_ms, d.fft_ms, d.speedup, d.use_fft, d.reason])
            rank_zero_info(
                f"FFTConvolution[{stage}] {d.layer}: {'FFT' if d.use_fft else 'direct'}"
                + (
                    f" (direct {d.direct_ms:.3f} ms, fft {d.fft_ms:.3f} ms, x{d.speedup:.2f})"
                    if d.input_shapes
                    else ""
                )
                + (f" - {d.reason}" if d.reason else "")
            )
        if trainer.loggers:
            log_scalars(trainer, metrics, step=trainer.global_step)
            log_table(
                trainer,
                "fftconv/decisions",
                ["stage", "layer", "input_shape", "direct_ms", "fft_ms", "speedup", "use_fft", "reason"],
                rows,
                step=trainer.global_step,
            )

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """``{"decisions": [...]}``: the latest decisions as plain dicts (the swapped layers are
        those with ``use_fft``)."""
        return {"decisions": [asdict(d) for d in self.decisions]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # informational: every stage re-decides (timings depend on the machine), and a loaded
        # model holds direct convolutions (the swap keeps the state_dict keys), so nothing is swapped
        self.decisions = [
            FFTDecision(**{**d, "input_shapes": [tuple(s) for s in d.get("input_shapes", [])]})
            for d in state_dict.get("decisions", [])
        ]
