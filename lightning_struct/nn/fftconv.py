"""Drop-in FFT convolutions: :class:`FFTConv2d` / :class:`FFTConv1d`.

They *are* ``nn.Conv2d`` / ``nn.Conv1d`` (subclasses overriding only ``_conv_forward``), so

* :meth:`FFTConv2d.from_conv` keeps the **same** ``weight``/``bias`` Parameter objects, hooks
  and attributes: the state_dict keys, the optimizer's parameter list and DDP's gradient hooks
  are untouched, and a checkpoint loads into either class;
* :meth:`FFTConv2d.to_conv` swaps back the same way;
* code that looks for ``nn.Conv2d`` layers (other callbacks, model surgery) still finds them.

In eval mode the kernel spectrum is cached per input size and reused until the weight changes.
"Changes" is checked exactly: the tensor's ``_version``/``data_ptr``/device/dtype must match
*and* the weight must equal the copy taken when the spectrum was made (this also catches
``weight.data.copy_(...)``, which does not bump ``_version``). The cache costs one copy of the
weight plus the spectrum (``N0 * (N1//2+1) * C_out * C_in/groups`` complex numbers).

Every ``padding_mode`` of ``nn.Conv2d`` is supported: ``zeros`` and ``circular`` natively,
``reflect``/``replicate`` by padding explicitly first (as ``nn.Conv2d`` does).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_struct._checks import check_bool
from lightning_struct.ops.fftconv import KernelSpectrum, fft_conv1d, fft_conv2d, kernel_spectrum
from lightning_struct.ops.portable import fft_conv_portable, is_tracing

__all__ = [
    "FFTConvNd",
    "FFTConv1d",
    "FFTConv2d",
    "ConvTiming",
    "fft_module_for",
    "time_direct_vs_fft",
    "unsupported_reason",
]

_C = TypeVar("_C", bound="FFTConvNd")


@dataclass
class _CacheEntry:
    key: tuple
    version: int
    ptr: int
    weight: Tensor
    spectrum: KernelSpectrum


def _copy_module_dict(src: nn.Module) -> dict[str, Any]:
    """Shallow copy of a module's ``__dict__``: same Parameters/buffers/hooks, fresh containers."""
    out: dict[str, Any] = {}
    for k, v in src.__dict__.items():
        if k in _FFT_ATTRS:
            continue
        out[k] = type(v)(v) if isinstance(v, (dict, set)) else v
    return out


_FFT_ATTRS = ("cache_spectrum", "_spectrum_cache", "_fft_source_class")


class FFTConvNd:
    """The base of :class:`FFTConv1d` / :class:`FFTConv2d`: kernel-spectrum caching and the swap
    to and from the direct convolution.

    ``isinstance(module, FFTConvNd)`` tells whether a layer is one of our FFT convolutions. It is
    a mixin placed before ``nn.Conv{1,2}d`` in the bases, not a module on its own.
    """

    cache_spectrum: bool
    _spectrum_cache: _CacheEntry | None
    _fft_source_class: type
    _direct_class: type[nn.Module]
    _nd: int

    def _init_fft(self, cache_spectrum: bool, source_class: type | None = None) -> None:
        check_bool(cache_spectrum, "cache_spectrum", type(self).__name__)
        object.__setattr__(self, "cache_spectrum", cache_spectrum)
        object.__setattr__(self, "_spectrum_cache", None)
        object.__setattr__(self, "_fft_source_class", source_class or self._direct_class)

    @classmethod
    def from_conv(cls: type[_C], conv: nn.Module, *, cache_spectrum: bool = True) -> _C:
        """An FFT convolution that shares everything with ``conv`` (Parameters, hooks, attributes).

        Raises:
            TypeError: ``conv`` is not a plain ``nn.Conv{1,2}d`` this class can replace (see
                :func:`unsupported_reason`).
        """
        if isinstance(conv, cls):
            return conv
        reason = unsupported_reason(conv)
        if reason is not None or not isinstance(conv, cls._direct_class):
            raise TypeError(
                f"{cls.__name__}.from_conv: cannot replace {type(conv).__name__}: "
                f"{reason or f'expected an nn.{cls._direct_class.__name__}'}"
            )
        new = cls.__new__(cls)
        new.__dict__.update(_copy_module_dict(conv))
        new._init_fft(cache_spectrum, type(conv))
        return new

    def to_conv(self) -> nn.Module:
        """The direct convolution (the class this layer was made from) sharing the same Parameters."""
        cls = self._fft_source_class
        conv = cls.__new__(cls)
        conv.__dict__.update(_copy_module_dict(self))  # type: ignore[arg-type]
        return conv

    def invalidate_cache(self) -> None:
        """Drop the cached kernel spectrum (it is also re-validated on every use)."""
        object.__setattr__(self, "_spectrum_cache", None)

    def _cached_spectrum(
        self, x: Tensor, weight: Tensor, padding: Any, padding_mode: str
    ) -> KernelSpectrum | None:
        conv: Any = self
        if not self.cache_spectrum or conv.training:
            return None
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        key = (tuple(x.shape[1:]), tuple(weight.shape), compute, weight.device, padding, padding_mode)
        c = self._spectrum_cache
        if (
            c is not None
            and c.key == key
            and c.version == weight._version
            and c.ptr == weight.data_ptr()
            and (torch.is_inference_mode_enabled() or not c.spectrum.data.is_inference())
            and torch.equal(c.weight, weight)
        ):
            return c.spectrum
        with torch.no_grad():
            spec = kernel_spectrum(
                weight.detach().to(compute),
                tuple(x.shape),
                conv.stride,
                padding,
                conv.dilation,
                conv.groups,
                padding_mode,  # type: ignore[arg-type]
            )
            entry = _CacheEntry(key, weight._version, weight.data_ptr(), weight.detach().clone(), spec)
        object.__setattr__(self, "_spectrum_cache", entry)
        return spec

    def _fft_conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv: Any = self
        if is_tracing():
            return self._portable_forward(input, weight, bias)
        fn: Callable[..., Tensor] = fft_conv2d if self._nd == 2 else fft_conv1d
        if conv.padding_mode in ("zeros", "circular"):
            x, padding, mode = input, conv.padding, conv.padding_mode
        else:
            x = F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding, mode = 0, "zeros"
        spec = self._cached_spectrum(x if x.dim() == self._nd + 2 else x.unsqueeze(0), weight, padding, mode)
        return fn(
            x,
            weight,
            bias,
            conv.stride,
            padding,
            conv.dilation,
            conv.groups,
            padding_mode=mode,
            spectrum=spec,
        )

    def _portable_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Under a tracer: pad explicitly, then FFT on the padded input's grid (no cache, any size)."""
        conv: Any = self
        batched = input.dim() == self._nd + 2
        x = input if batched else input.unsqueeze(0)
        pads = conv._reversed_padding_repeated_twice
        if any(pads):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pads, mode=mode)
        y = fft_conv_portable(x, weight, bias, tuple(conv.stride), tuple(conv.dilation), conv.groups)
        return y if batched else y.squeeze(0)

    def __init__(self, *args: Any, cache_spectrum: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_fft(cache_spectrum)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._fft_conv_forward(input, weight, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fft=True"


class FFTConv2d(FFTConvNd, nn.Conv2d):
    """``nn.Conv2d`` computed by FFT (:func:`lightning_struct.ops.fftconv.fft_conv2d`).

    Same constructor as ``nn.Conv2d`` plus ``cache_spectrum`` (cache the kernel spectrum in eval
    mode). Numerically equal to ``nn.Conv2d`` (float32: ~1e-6 relative; float64: ~1e-15).

    Example::

        fft = FFTConv2d.from_conv(model.stem)   # same Parameters, same state_dict keys
        model.stem = fft
        ...
        model.stem = fft.to_conv()               # and back
    """

    _direct_class = nn.Conv2d
    _nd = 2


class FFTConv1d(FFTConvNd, nn.Conv1d):
    """``nn.Conv1d`` computed by FFT (:func:`lightning_struct.ops.fftconv.fft_conv1d`); see
    :class:`FFTConv2d`."""

    _direct_class = nn.Conv1d
    _nd = 1


def unsupported_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot be swapped for an FFT convolution, or ``None`` if it can.

    Supported: ``nn.Conv1d``/``nn.Conv2d`` and subclasses that do not override ``forward`` or
    ``_conv_forward`` (also pruned layers, whose weight is recomputed by a forward pre-hook).
    Not supported: parametrized weights (``torch.nn.utils.parametrize``), subclasses with their own
    forward, transposed convolutions and other types.
    """
    if isinstance(conv, FFTConvNd):
        return None
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
        return f"{type(conv).__name__} is not an nn.Conv1d / nn.Conv2d"
    if parametrize.is_parametrized(conv):
        return "its weight is parametrized (torch.nn.utils.parametrize); remove the parametrization first"
    base = nn.Conv2d if isinstance(conv, nn.Conv2d) else nn.Conv1d
    for name in ("forward", "_conv_forward"):
        if getattr(type(conv), name) is not getattr(base, name):
            return f"{type(conv).__name__} overrides {name}()"
    return None


def fft_module_for(conv: nn.Module, *, cache_spectrum: bool = True) -> nn.Module:
    """``FFTConv2d.from_conv`` or ``FFTConv1d.from_conv`` depending on the layer's type."""
    if isinstance(conv, nn.Conv2d):
        return FFTConv2d.from_conv(conv, cache_spectrum=cache_spectrum)
    if isinstance(conv, nn.Conv1d):
        return FFTConv1d.from_conv(conv, cache_spectrum=cache_spectrum)
    raise TypeError(f"fft_module_for: {type(conv).__name__} is not an nn.Conv1d / nn.Conv2d")


# --------------------------------------------------------------------------------------------
# timing (used by the FFTConvolution callback and by the benchmark)
# --------------------------------------------------------------------------------------------
@dataclass
class ConvTiming:
    """Seconds per call (fastest of the timed calls) of the direct and the FFT version of one
    layer on one shape."""

    direct_s: float
    fft_s: float

    @property
    def speedup(self) -> float:
        """``direct_s / fft_s`` (> 1: FFT is faster)."""
        return self.direct_s / self.fft_s if self.fft_s > 0 else math.inf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _train_mode(module: nn.Module, train: bool) -> Iterator[None]:
    was = module.training
    module.train(train)
    try:
        yield
    finally:
        module.train(was)


def time_direct_vs_fft(
    conv: nn.Module,
    input_shape: Sequence[int],
    *,
    train: bool,
    input_requires_grad: bool = True,
    dtype: torch.dtype | None = None,
    repeats: int = 5,
    warmup: int = 1,
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    seed: int = 0,
    decisive_ratio: float | None = 4.0,
) -> ConvTiming:
    """Time ``conv`` directly and as an FFT convolution on a random input of ``input_shape``.

    ``train=True`` times forward + backward (gradients by ``torch.autograd.grad``, so the layer's
    ``.grad`` fields are never touched) in train mode; ``train=False`` times the forward in eval
    mode under ``torch.no_grad`` (the FFT layer's kernel-spectrum cache is warm, as in
    inference). The two versions alternate (``warmup`` + ``repeats`` calls each) so drifting
    load affects both alike, and the fastest call of each is returned (interruptions by other
    processes only ever add time, so the minimum is the robust estimate of a layer's cost). Once
    one version is ``decisive_ratio`` times slower than the other after two timed rounds (or
    after one, when the slower call took over a second), timing stops early: noise cannot flip
    such a gap, and huge direct layers are not timed over and over. ``None`` always runs all
    ``repeats``. ``context`` (e.g. an autocast context factory) wraps every call. The random input comes from a private generator: the global RNG
    state is not touched. Parameters are shared, never modified.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_direct_vs_fft: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    direct = conv.to_conv() if isinstance(conv, FFTConvNd) else conv
    fft = fft_module_for(direct)
    p = next(iter(direct.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = dtype or (p.dtype if p is not None else torch.float32)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    x = torch.randn(tuple(input_shape), generator=gen, device=device, dtype=dtype)
    ctx = context or contextlib.nullcontext

    def make_call(mod: nn.Module) -> Callable[[], None]:
        if not train:

            def call() -> None:
                with torch.no_grad(), ctx():
                    mod(x)

            return call
        xin = x.detach().requires_grad_(input_requires_grad)
        gy: list[Tensor] = []

        def call_train() -> None:
            with ctx():
                y = mod(xin)
            if not gy:
                gy.append(torch.randn(y.shape, generator=gen, device=device, dtype=y.dtype))
            wrt = [
                t
                for t in (xin, getattr(mod, "weight", None), getattr(mod, "bias", None))
                if t is not None and t.requires_grad
            ]
            if wrt:
                torch.autograd.grad(y, wrt, gy[0])

        return call_train

    calls = {"direct": make_call(direct), "fft": make_call(fft)}
    times: dict[str, list[float]] = {"direct": [], "fft": []}
    with _train_mode(direct, train), _train_mode(fft, train):
        for i in range(warmup + repeats):
            for name, call in calls.items():
                _sync(device)
                t0 = time.perf_counter()
                call()
                _sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
            rounds = i + 1 - warmup
            if rounds >= 1 and decisive_ratio is not None:
                a, b = min(times["direct"]), min(times["fft"])
                if max(a, b) >= decisive_ratio * min(a, b) and (rounds >= 2 or max(a, b) > 1.0):
                    break
    return ConvTiming(min(times["direct"]), min(times["fft"]))
