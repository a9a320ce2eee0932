"""Every converted form traces and exports: torch.export, ONNX + onnxruntime, torch.compile(fullgraph).

Each form is exported at one input size and run at another batch *and* spatial/sequence size;
outputs must agree with eager to 1e-4 relative, and gradients of the traced (plain-torch) forms
must match the eager fast kernels and the brute-force references.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_struct.deploy import ExportMismatchError, export, fold_batchnorm, fold_fft
from lightning_struct.deploy.runtime import has_onnx
from lightning_struct.nn import (
    ACDC,
    ACDCConv1x1,
    ACDCStack,
    FFTConv1d,
    FFTConv2d,
    LowRankConv2d,
    LowRankLinear,
    TiedBottleneck,
    TiedMLP,
)
from lightning_struct.ops import portable
from lightning_struct.ops.acdc import acdc_stack, acdc_stack_reference
from lightning_struct.ops.dct import dct_matrix

needs_onnx = pytest.mark.skipif(not has_onnx(), reason="the export extra (onnx, onnxruntime, onnxscript) is not installed")
RTOL = 1e-4


class Mixed(nn.Module):
    """A small net mixing every converted form (the order a converted CNN + head would have)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = FFTConv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.lr = LowRankConv2d(16, 16, 3, rank=4, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.tied = TiedBottleneck(16, 4)
        self.mix = ACDCConv1x1(16, 16, n_factors=2, relu=False)
        self.head = LowRankLinear(16, 12, rank=3)
        self.acdc = ACDCStack(12, 10, n_factors=2)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.bn2(self.lr(x)))
        x = self.mix(self.tied(x))
        return self.acdc(self.head(x.mean((2, 3))))


def _forms():
    torch.manual_seed(0)
    forms = {
        "lowrank_channel": (LowRankConv2d(8, 16, 3, rank=4, scheme="channel", padding=1), (2, 8, 12, 12), (3, 8, 9, 11)),
        "lowrank_spatial": (LowRankConv2d(8, 16, 3, rank=4, scheme="spatial", padding=1, stride=2), (2, 8, 12, 12), (3, 8, 9, 11)),
        "lowrank_tucker2": (LowRankConv2d(8, 16, 3, rank=(4, 5), scheme="tucker2", padding=1), (2, 8, 12, 12), (3, 8, 9, 11)),
        "lowrank_linear": (LowRankLinear(20, 12, rank=5), (2, 20), (5, 20)),
        "acdc": (ACDC(15), (2, 15), (5, 15)),
        "acdc_stack": (ACDCStack(20, 12, n_factors=3), (2, 20), (5, 20)),
        "acdc_conv1x1": (ACDCConv1x1(8, 12, n_factors=2, stride=2), (2, 8, 6, 6), (3, 8, 5, 7)),
        "tied_bottleneck": (TiedBottleneck(16, 4), (2, 16, 8, 8), (3, 16, 7, 9)),
        "tied_mlp": (TiedMLP(16, 32), (2, 5, 16), (3, 7, 16)),
        "fftconv2d": (FFTConv2d(4, 6, 3, padding=1, stride=2, dilation=2, groups=2), (2, 4, 12, 12), (3, 4, 9, 13)),
        "fftconv2d_reflect": (FFTConv2d(4, 6, (3, 5), padding=(1, 2), padding_mode="reflect"), (2, 4, 12, 12), (3, 4, 9, 13)),
        "fftconv1d": (FFTConv1d(4, 6, 5, padding=2), (2, 4, 20), (3, 4, 17)),
        "mixed": (Mixed(), (2, 3, 16, 16), (3, 3, 13, 19)),
    }
    for m, _, _ in forms.values():
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):  # non-trivial statistics, so folding is really tested
                b.running_mean.uniform_(-0.5, 0.5)
                b.running_var.uniform_(0.5, 2.0)
    return forms


FORMS = _forms()


def _rel(y, ref):
    return float((y - ref).abs().max() / ref.abs().max())


@pytest.fixture
def form(request):
    m, s1, s2 = FORMS[request.param]
    return m.eval(), torch.randn(s1), torch.randn(s2)


@pytest.mark.parametrize("form", list(FORMS), indirect=True)
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "nonstrict"])
def test_torch_export_runs_at_other_sizes(form, strict):
    m, x, x2 = form
    dyn = ({i: torch.export.Dim.AUTO for i in range(x.ndim)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, (x,), dynamic_shapes=dyn, strict=strict)
    with torch.no_grad():
        assert _rel(ep.module()(x2), m(x2)) <= RTOL
        assert _rel(ep.module()(x), m(x)) <= RTOL


@needs_onnx
@pytest.mark.parametrize("form", list(FORMS), indirect=True)
def test_onnx_export_agrees_in_onnxruntime_at_other_sizes(form, tmp_path):
    m, x, x2 = form
    res = export(m, x, tmp_path / "m.onnx", "onnx", fold=False)
    assert res.path.is_file()
    assert 0 in res.dynamic_dims
    assert len(res.checks) >= 3 and res.max_rel_error <= RTOL  # the example and two fresh sizes
    # and independently of export()'s own check, at the test's size
    from lightning_struct.deploy.runtime import load_runner

    run = load_runner(res.path, "onnx")
    with torch.no_grad():
        assert _rel(run(x2), m(x2)) <= RTOL


@pytest.mark.parametrize("form", list(FORMS), indirect=True)
def test_compile_fullgraph_forward_and_gradients(form):
    """Dynamo captures one graph (fullgraph) in training mode; outputs and grads equal the eager kernels."""
    m, _, x2 = form
    m.train()
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=True)
    xin = x2.clone().requires_grad_(True)
    xref = x2.clone().requires_grad_(True)
    torch.manual_seed(1)
    y = compiled(xin)
    torch.manual_seed(1)
    ref = m(xref)
    assert _rel(y, ref) <= RTOL
    g = torch.randn_like(ref)
    params = [p for p in m.parameters() if p.requires_grad]
    got = torch.autograd.grad(y, [xin, *params], g)
    want = torch.autograd.grad(ref, [xref, *params], g)
    scale = max(float(b.abs().max()) for b in want)  # a bias in front of a training BatchNorm has a ~0 gradient
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) <= 1e-3 * max(float(b.abs().max()), 1e-3 * scale)
    m.eval()


# ------------------------------------------------------------------ the plain-torch forms themselves
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
def test_portable_dct_matches_dense_matrix(n):
    x = torch.randn(3, n, dtype=torch.float64)
    c = dct_matrix(n)
    torch.testing.assert_close(portable.dct_portable(x), x @ c.T)
    torch.testing.assert_close(portable.idct_portable(x), x @ c)
    torch.testing.assert_close(portable.dct_portable(x, c), x @ c.T)


@pytest.mark.parametrize("n,k,bias,relu,perm", [(9, 3, True, True, True), (16, 1, False, False, False), (12, 2, True, False, True)])
def test_portable_acdc_matches_reference_values_and_gradients(n, k, bias, relu, perm):
    torch.manual_seed(0)
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    a, d = (torch.randn(k, n, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ab, db = ((torch.randn(k, n, dtype=torch.float64, requires_grad=True) for _ in range(2)) if bias else (None, None))
    perms = torch.stack([torch.randperm(n) for _ in range(k - 1)]) if perm and k > 1 else None
    args = [t for t in (x, a, d, ab, db) if t is not None]
    y = portable.acdc_stack_portable(x, a, d, ab, db, perms, relu)
    ref = acdc_stack_reference(x, a, d, ab, db, perms, relu)
    fast = acdc_stack(x, a, d, ab, db, perms, relu)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y, fast)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, args, g), torch.autograd.grad(ref, args, g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 5), padding=(2, 1), stride=(2, 3)),
        dict(kernel_size=3, dilation=2, padding=2, groups=2),
        dict(kernel_size=4, padding="same"),
        dict(kernel_size=3, padding=1, padding_mode="circular", stride=2),
        dict(kernel_size=3, padding=2, padding_mode="replicate", bias=False),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_portable_fftconv_matches_conv2d_values_and_gradients(cfg, monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **cfg).double()
    fft = FFTConv2d.from_conv(conv)
    monkeypatch.setattr("lightning_struct.nn.fftconv.is_tracing", lambda: True)
    for shape in [(2, 4, 11, 13), (1, 4, 8, 8), (4, 11, 13)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y, ref = fft(x), conv(x)
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(ref)
        params = [p for p in conv.parameters()]
        for got, want in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(ref, [x, *params], g)):
            torch.testing.assert_close(got, want)


def test_eager_forward_keeps_the_fast_kernels(monkeypatch):
    """Outside a tracer the modules never take the plain-torch path (no eager speed regression)."""

    def boom(*a, **k):
        raise AssertionError("portable path used in eager mode")

    monkeypatch.setattr("lightning_struct.nn.acdc.acdc_stack_portable", boom)
    monkeypatch.setattr("lightning_struct.nn.fftconv.fft_conv_portable", boom)
    m = Mixed().train()
    m(torch.randn(2, 3, 16, 16)).sum().backward()
    m.eval()(torch.randn(2, 3, 16, 16))


# ------------------------------------------------------------------ export(): folding, formats, refusal
def test_fold_batchnorm_and_fft_are_exact():
    m = FORMS["mixed"][0].eval()
    import copy

    work = copy.deepcopy(m)
    assert fold_fft(work) == ["stem"]
    folded = fold_batchnorm(work)
    assert folded == ["stem -> bn", "lr -> bn2"]
    assert isinstance(work.bn, nn.Identity) and isinstance(work.bn2, nn.Identity)
    assert type(work.stem) is nn.Conv2d
    x = torch.randn(3, 3, 15, 17)
    with torch.no_grad():
        assert _rel(work(x), m(x)) <= 1e-5


@pytest.mark.parametrize("fmt", ["exported_program", "torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_export_formats_fold_by_default_and_reload(fmt, tmp_path):
    m = FORMS["mixed"][0].eval()
    res = export(m, torch.randn(2, 3, 16, 16), tmp_path / f"mixed.{fmt}", fmt)
    assert res.folded["fft"] == ["stem"] and len(res.folded["batchnorm"]) == 2
    assert res.max_rel_error <= RTOL and len(res.checks) == 3
    assert res.dynamic_dims == [0, 2, 3]
    assert "checked against eager" in res.summary()
    assert isinstance(m.stem, FFTConv2d) and isinstance(m.bn, nn.BatchNorm2d)  # the caller's model is untouched


@needs_onnx
def test_onnx_acdc_dct_is_chosen_by_onnxruntime_timing(tmp_path):
    m = ACDCStack(64, n_factors=4).eval()
    res = export(m, torch.randn(8, 64), tmp_path / "a.onnx")
    assert set(res.acdc_dct_timings) == {"fft", "matmul"}
    assert res.acdc_dct == min(res.acdc_dct_timings, key=res.acdc_dct_timings.get)
    forced = export(m, torch.randn(8, 64), tmp_path / "b.onnx", acdc_dct="fft")
    assert forced.acdc_dct == "fft" and forced.max_rel_error <= RTOL


class _Branchy(nn.Module):
    """A Python branch on the batch size: a trace records one side only."""

    def forward(self, x):
        return x * 2 if x.shape[0] == 2 else -x


def test_export_refuses_an_artifact_that_disagrees_and_writes_nothing(tmp_path):
    x = torch.ones(2, 3)  # the trace records "x * 2"; the fresh inputs (other batch sizes) take the other side
    target = tmp_path / "b.pt"
    with pytest.raises(ExportMismatchError, match="disagrees with the eager model"):
        export(_Branchy(), x, target, "torchscript", seed=3, rtol=1e-4)
    assert not target.exists()


def test_export_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        export(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x", "tflite")
    with pytest.raises(ValueError, match="fold"):
        export(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x", "torchscript", fold="everything")


def test_a_warm_spectrum_cache_never_leaks_its_shape_into_a_trace(tmp_path):
    """Eval-mode FFT convs cache the kernel spectrum per input size; traces ignore it."""
    torch.manual_seed(0)
    fft = FFTConv2d(3, 4, 5, padding=2).eval()
    x, x2 = torch.randn(2, 3, 12, 12), torch.randn(3, 3, 9, 13)
    with torch.no_grad():
        fft(x)  # the cache now holds the 12x12 spectrum
    assert fft._spectrum_cache is not None
    ref = F.conv2d(x2, fft.weight, fft.bias, padding=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(fft, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},))
        traced = torch.jit.trace(fft, (x,), check_trace=False)
    with torch.no_grad():
        assert _rel(ep.module()(x2), ref) <= RTOL
        assert _rel(traced(x2), ref) <= RTOL
    res = export(fft, x, tmp_path / "f.pt", "torchscript", fold=False)
    assert res.max_rel_error <= RTOL and res.dynamic_dims == [0, 2, 3]
