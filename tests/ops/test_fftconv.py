"""fft_conv2d / fft_conv1d against F.conv2d / F.conv1d: forward, both gradients, errors, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_struct.ops.fftconv import (
    fast_fft_size,
    fft_conv1d,
    fft_conv2d,
    kernel_spectrum,
    plan_fft_conv2d,
)

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP hand-offs between threads cost more than the math (and dominate on a
    busy machine); results do not depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------
def _same_pads(k: int, d: int) -> tuple[int, int]:
    total = d * (k - 1)
    return total // 2, total - total // 2


def _reference2d(x, w, b, stride, padding, dilation, groups, mode):
    """What nn.Conv2d computes: F.conv2d, or explicit circular padding then a valid conv."""
    if mode == "zeros":
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    kh, kw = w.shape[-2:]
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    if padding == "same":
        (pt, pb), (pl, pr) = _same_pads(kh, dh), _same_pads(kw, dw)
    elif padding == "valid":
        pt = pb = pl = pr = 0
    else:
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        pt = pb = ph
        pl = pr = pw
    xp = F.pad(x, (pl, pr, pt, pb), mode="circular")
    return F.conv2d(xp, w, b, stride, 0, dilation, groups)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (an FFT's error scales with the signal, not per entry)."""
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _compare(case: dict, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(case["seed"])
    b_, c, o, g = case["batch"], case["c_in"], case["c_out"], case["groups"]
    x = torch.randn(b_, c, case["h"], case["w"], dtype=dtype, requires_grad=True)
    w = torch.randn(o, c // g, case["kh"], case["kw"], dtype=dtype, requires_grad=True)
    bias = torch.randn(o, dtype=dtype, requires_grad=True) if case["bias"] else None
    args = (case["stride"], case["padding"], case["dilation"], g)
    ref = _reference2d(x, w, bias, *args, case["mode"])
    out = fft_conv2d(x, w, bias, *args, padding_mode=case["mode"])
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert _rel_err(out, ref) < tol, ("forward", case)
    gy = torch.randn_like(ref)
    wrt = [t for t in (x, w, bias) if t is not None]
    g_ref = torch.autograd.grad(ref, wrt, gy)
    g_out = torch.autograd.grad(out, wrt, gy)
    for name, a, r in zip(("input", "weight", "bias"), g_out, g_ref):
        assert a.shape == r.shape
        assert _rel_err(a, r) < tol, (f"grad {name}", case)


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    """Shapes, strides, dilations, groups (incl. depthwise), paddings and modes F.conv2d accepts."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans())
    cg = 1 if depthwise else draw(st.integers(1, 3))
    og = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    scalar_dilation = draw(st.booleans())
    dh = draw(st.integers(1, 3))
    dw = dh if scalar_dilation else draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["zeros", "zeros", "circular"]))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride: int | tuple[int, int]
    if pad_kind == "same":
        stride = 1
    else:
        stride = draw(st.sampled_from([1, 2, 3, (1, 2), (2, 1), (3, 2)]))
    ekh, ekw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    h = draw(st.integers(max(1, ekh - 4), ekh + 9))
    w = draw(st.integers(max(1, ekw - 4), ekw + 9))
    padding: int | str | tuple[int, int]
    if pad_kind == "int":
        padding = draw(st.integers(0, 3))
        ph = pw = padding
    elif pad_kind == "tuple":
        ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        padding = (ph, pw)
    else:
        padding = pad_kind
        ph = pw = 0
        if pad_kind == "same":
            ph, pw = _same_pads(kh, dh)[1], _same_pads(kw, dw)[1]
    # F.conv2d needs the padded input to hold the dilated kernel; circular padding <= size
    if pad_kind in ("int", "tuple", "valid"):
        h = max(h, ekh - 2 * ph)
        w = max(w, ekw - 2 * pw)
    if mode == "circular":
        h, w = max(h, ph, 1), max(w, pw, 1)
    return dict(
        batch=draw(st.integers(1, 3)),
        c_in=cg * groups,
        c_out=og * groups,
        groups=groups,
        kh=kh,
        kw=kw,
        h=h,
        w=w,
        stride=stride,
        padding=padding,
        dilation=dh if scalar_dilation else (dh, dw),
        mode=mode,
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, **_SETTINGS)
@given(conv_cases())
def test_matches_conv2d_float64(case: dict) -> None:
    _compare(case, torch.float64, 1e-10)


@settings(max_examples=30, **_SETTINGS)
@given(conv_cases())
def test_matches_conv2d_float32(case: dict) -> None:
    _compare(case, torch.float32, 1e-4)


@pytest.mark.parametrize(
    "shape, k, stride, padding, dilation, groups",
    [
        ((2, 4, 17, 16), (5, 5), 2, 2, 1, 1),  # stride folded into the spectrum
        ((1, 6, 15, 13), (4, 3), (3, 2), (1, 2), (1, 2), 3),
        ((2, 3, 12, 12), (3, 3), 2, 1, 1, 3),  # depthwise, folded stride
        ((2, 4, 9, 9), (2, 2), 1, "same", 2, 2),  # even kernel, asymmetric 'same'
        ((1, 2, 8, 8), (3, 3), 1, 20, 1, 1),  # padding wider than the kernel: border = bias
    ],
)
def test_large_and_special_cases_float64(shape, k, stride, padding, dilation, groups) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * groups, shape[1] // groups, *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2 * groups, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, w, b, stride, padding, dilation, groups)
    out = fft_conv2d(x, w, b, stride, padding, dilation, groups)
    assert _rel_err(out, ref) < 1e-12
    gy = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy)):
        assert _rel_err(a, r) < 1e-12


def test_stride_fold_equals_spatial_subsampling() -> None:
    """Both stride strategies are exact (the benchmark compares their speed)."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 21, 19, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, w, None, (3, 2), 2, 1, 2)
    gy = torch.randn_like(ref)
    results = []
    for fold in (True, False):
        plan = plan_fft_conv2d(x.shape, w.shape, (3, 2), 2, 1, 2, fold_stride=fold)
        assert (plan.axes[0].fold == 3) is fold
        out = fft_conv2d(x, w, None, (3, 2), 2, 1, 2, fold_stride=fold)
        results.append((out, *torch.autograd.grad(out, (x, w), gy)))
    for a, r in zip(results[0], results[1]):
        assert _rel_err(a, r) < 1e-12
    assert _rel_err(results[0][0], ref) < 1e-12


def test_gradcheck_small_float64() -> None:
    torch.manual_seed(2)
    for stride, padding, groups, mode, cin in [
        (1, 1, 1, "zeros", 2),
        (2, (1, 2), 2, "zeros", 2),
        (2, 1, 2, "zeros", 2),  # depthwise
        (1, "same", 1, "circular", 2),
    ]:
        x = torch.randn(2, cin, 6, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, cin // groups, 3, 2, dtype=torch.float64, requires_grad=True)
        b = torch.randn(2, dtype=torch.float64, requires_grad=True)

        def fn(x, w, b, stride=stride, padding=padding, groups=groups, mode=mode):
            return fft_conv2d(x, w, b, stride, padding, 1, groups, padding_mode=mode)

        assert torch.autograd.gradcheck(fn, (x, w, b))


def test_only_requested_gradients() -> None:
    """Frozen weight / data input: the Function skips the unused products (and agrees)."""
    x = torch.randn(2, 3, 10, 10)
    w = torch.randn(4, 3, 5, 5, requires_grad=True)
    (gw,) = torch.autograd.grad(fft_conv2d(x, w, padding=2).sum(), (w,))
    (gw_ref,) = torch.autograd.grad(F.conv2d(x, w, padding=2).sum(), (w,))
    assert _rel_err(gw, gw_ref) < 1e-5
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(fft_conv2d(xg, w.detach(), padding=2).sum(), (xg,))
    (gx_ref,) = torch.autograd.grad(F.conv2d(xg, w.detach(), padding=2).sum(), (xg,))
    assert _rel_err(gx, gx_ref) < 1e-5


# ------------------------------------------------------------------------------------------
# 1-D
# ------------------------------------------------------------------------------------------
@settings(max_examples=25, **_SETTINGS)
@given(
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    cg=st.integers(1, 3),
    og=st.integers(1, 3),
    k=st.integers(1, 7),
    d=st.integers(1, 3),
    extra=st.integers(0, 12),
    stride=st.integers(1, 3),
    padding=st.sampled_from([0, 1, 3, "valid", "same"]),
    seed=st.integers(0, 999),
)
def test_conv1d_matches(batch, groups, cg, og, k, d, extra, stride, padding, seed) -> None:
    torch.manual_seed(seed)
    if padding == "same":
        stride = 1
    n = d * (k - 1) + 1 + extra
    x = torch.randn(batch, cg * groups, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(og * groups, cg, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(og * groups, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(x, w, b, stride, padding, d, groups)
    out = fft_conv1d(x, w, b, stride, padding, d, groups)
    assert out.shape == ref.shape and _rel_err(out, ref) < 1e-10
    gy = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy)):
        assert _rel_err(a, r) < 1e-10


def test_conv1d_circular_and_unbatched() -> None:
    torch.manual_seed(3)
    x = torch.randn(3, 20, dtype=torch.float64)
    w = torch.randn(4, 3, 5, dtype=torch.float64)
    ref = F.conv1d(F.pad(x[None], (2, 2), mode="circular"), w)[0]
    assert _rel_err(fft_conv1d(x, w, padding=2, padding_mode="circular"), ref) < 1e-12


# ------------------------------------------------------------------------------------------
# spectra, sizes, shapes
# ------------------------------------------------------------------------------------------
def test_fast_fft_size() -> None:
    assert [fast_fft_size(n) for n in (1, 7, 11, 13, 17, 97, 121)] == [1, 8, 12, 15, 18, 100, 125]
    assert fast_fft_size(7, even=True) == 8 and fast_fft_size(13, even=True) == 16
    assert fast_fft_size(25, even=True) == 30
    with pytest.raises(ValueError, match="n=0"):
        fast_fft_size(0)


def test_plan_grid_is_small_and_5_smooth() -> None:
    plan = plan_fft_conv2d((2, 8, 128, 128), (8, 8, 15, 15), padding=7)
    n0, n1 = plan.axes[0].grid, plan.axes[1].grid
    assert n0 == n1 == 144  # 128 + 14 = 142 -> 144 = 2^4 3^2
    assert plan.out_hw == (128, 128)
    plan = plan_fft_conv2d((2, 8, 64, 64), (8, 8, 7, 7), stride=2, padding=3)
    a0 = plan.axes[0]
    assert a0.fold == 2 and a0.grid % 2 == 0 and a0.coarse >= a0.n_out


def test_precomputed_spectrum_is_reused_and_checked() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    spec = kernel_spectrum(w, x.shape, 2, 1, 1, 2)
    out = fft_conv2d(x, w, None, 2, 1, 1, 2, spectrum=spec)
    ref = F.conv2d(x, w, None, 2, 1, 1, 2)
    assert _rel_err(out, ref) < 1e-5
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.sum(), (x, w))
    assert _rel_err(gx, rx) < 1e-5 and _rel_err(gw, rw) < 1e-5
    with pytest.raises(ValueError, match="spectrum"):
        fft_conv2d(x, w, None, 1, 1, 1, 2, spectrum=spec)  # other stride: other plan
    with pytest.raises(ValueError, match="spectrum"):
        fft_conv2d(x.double(), w.double(), None, 2, 1, 1, 2, spectrum=spec)  # other dtype


def test_empty_batch_and_unbatched() -> None:
    w = torch.randn(4, 3, 3, 3)
    assert fft_conv2d(torch.randn(0, 3, 8, 8), w, padding=1).shape == (0, 4, 8, 8)
    x = torch.randn(3, 9, 7)
    assert _rel_err(fft_conv2d(x, w, stride=2), F.conv2d(x, w, stride=2)) < 1e-5


# ------------------------------------------------------------------------------------------
# dtypes: half inputs and autocast compute in float32 and cast back
# ------------------------------------------------------------------------------------------
def test_cpu_autocast_bfloat16() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    w = torch.randn(8, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.conv2d(x, w, padding=2)
        out = fft_conv2d(x, w, padding=2)
    assert out.dtype == ref.dtype == torch.bfloat16
    exact = F.conv2d(x, w, padding=2)
    # ours rounds only the result to bfloat16: at least as close to the float32 conv as F.conv2d's
    assert _rel_err(out.float(), exact) <= max(_rel_err(ref.float(), exact), 1e-2)
    gx, gw = torch.autograd.grad(out.float().sum(), (x, w))
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    rx, rw = torch.autograd.grad(exact.sum(), (x, w))
    assert _rel_err(gx, rx) < 2e-2 and _rel_err(gw, rw) < 2e-2


def test_half_inputs_without_autocast_return_half() -> None:
    x = torch.randn(1, 2, 10, 10)
    w = torch.randn(3, 2, 3, 3)
    for dt in (torch.float16, torch.bfloat16):
        out = fft_conv2d(x.to(dt), w.to(dt), padding=1)
        assert out.dtype == dt
        assert _rel_err(out.float(), F.conv2d(x.to(dt).float(), w.to(dt).float(), padding=1)) < 1e-2


# ------------------------------------------------------------------------------------------
# bad arguments: the same rules as F.conv2d, as ValueError / TypeError naming the argument
# ------------------------------------------------------------------------------------------
_BAD = [
    # (input shape, weight shape, kwargs, error type, message fragment)
    ((2, 4, 8, 8), (6, 3, 3, 3), {}, ValueError, "weight"),  # channel mismatch
    ((2, 4, 8, 8), (6, 2, 3, 3), {"groups": 3}, ValueError, "groups"),  # 4 channels, 3 groups
    ((2, 4, 8, 8), (5, 2, 3, 3), {"groups": 2}, ValueError, "multiple of groups"),
    ((2, 4, 8, 8), (6, 4, 3, 3), {"stride": 0}, ValueError, "stride"),
    ((2, 4, 8, 8), (6, 4, 3, 3), {"dilation": 0}, ValueError, "dilation"),
    ((2, 4, 8, 8), (6, 4, 3, 3), {"padding": -1}, ValueError, "padding"),
    ((2, 4, 8, 8), (6, 4, 3, 3), {"padding": "full"}, ValueError, "padding"),
    ((2, 4, 8, 8), (6, 4, 3, 3), {"padding": "same", "stride": 2}, ValueError, "strided"),
    ((2, 4, 8, 8), (6, 4, 3, 3), {"padding": (1, 1, 1)}, ValueError, "padding"),
    ((2, 4, 4, 4), (6, 4, 7, 7), {}, ValueError, "kernel size"),
    ((2, 4, 8, 8), (6, 4, 3), {}, ValueError, "weight"),
    ((4, 8), (6, 4, 3, 3), {}, ValueError, "input"),
    ((2, 4, 8, 8), (6, 4, 3, 3), {"groups": 0}, ValueError, "groups"),
]


@pytest.mark.parametrize("xshape, wshape, kwargs, err, fragment", _BAD)
def test_bad_arguments_raise_like_conv2d(xshape, wshape, kwargs, err, fragment) -> None:
    x, w = torch.randn(*xshape), torch.randn(*wshape)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        F.conv2d(x, w, **kwargs)
    with pytest.raises(err, match=fragment):
        fft_conv2d(x, w, **kwargs)


def test_bad_dtypes_and_bias() -> None:
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    with pytest.raises(TypeError, match="same dtype"):
        fft_conv2d(x, w.double())
    with pytest.raises(TypeError, match="floating"):
        fft_conv2d(x.long(), w.long())
    with pytest.raises(ValueError, match="bias"):
        fft_conv2d(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="padding_mode"):
        fft_conv2d(x, w, padding_mode="reflect")
    with pytest.raises(ValueError, match="circular"):
        fft_conv2d(x, w, padding=7, padding_mode="circular")
    with pytest.raises(TypeError, match="stride"):
        fft_conv2d(x, w, stride=1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# CUDA (runs where a GPU is present)
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("groups, stride", [(1, 1), (2, 2), (4, 1)])
def test_cuda_matches_conv2d(groups, stride) -> None:
    torch.manual_seed(6)
    dev = torch.device("cuda")
    x = torch.randn(3, 4, 33, 30, device=dev, requires_grad=True)
    w = torch.randn(8, 4 // groups, 7, 5, device=dev, requires_grad=True)
    b = torch.randn(8, device=dev, requires_grad=True)
    ref = F.conv2d(x, w, b, stride, 3, 1, groups)
    out = fft_conv2d(x, w, b, stride, 3, 1, groups)
    assert out.device == dev and _rel_err(out, ref) < 1e-4
    gy = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy)):
        assert _rel_err(a, r) < 1e-4
    xd, wd = x.detach().double(), w.detach().double()
    assert (
        _rel_err(fft_conv2d(xd, wd, None, stride, 3, 1, groups), F.conv2d(xd, wd, None, stride, 3, 1, groups))
        < 1e-10
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype) -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 8, 32, 32, device="cuda", requires_grad=True)
    w = torch.randn(8, 8, 9, 9, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        ref = F.conv2d(x, w, padding=4)
        out = fft_conv2d(x, w, padding=4)
    assert out.dtype == ref.dtype == dtype
    exact = F.conv2d(x, w, padding=4)
    assert _rel_err(out.float(), exact) < 2e-2
    gx, gw = torch.autograd.grad(out.float().sum(), (x, w))
    rx, rw = torch.autograd.grad(exact.sum(), (x, w))
    assert _rel_err(gx, rx) < 2e-2 and _rel_err(gw, rw) < 2e-2
