"""FFTConv2d / FFTConv1d: drop-in swaps that keep Parameters, state_dict keys and optimizers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

from lightning_struct.nn import FFTConv1d, FFTConv2d
from lightning_struct.nn import fftconv as nn_fftconv
from lightning_struct.nn.fftconv import fft_module_for, time_direct_vs_fft, unsupported_reason
from lightning_struct.ops import fftconv as ops_fftconv


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, padding=3)
        self.conv2 = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
def test_from_conv_same_parameters_and_outputs(mode) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(
        4, 6, (5, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2, padding_mode=mode
    )
    fft = FFTConv2d.from_conv(conv)
    assert isinstance(fft, nn.Conv2d) and isinstance(fft, FFTConv2d)
    assert fft.weight is conv.weight and fft.bias is conv.bias
    assert list(fft.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 4, 13, 12)
    assert _rel(fft(x), conv(x)) < 1e-5
    back = fft.to_conv()
    assert type(back) is nn.Conv2d and back.weight is conv.weight
    assert _rel(back(x), conv(x)) == 0.0


def test_state_dict_round_trip_between_classes() -> None:
    torch.manual_seed(1)
    net = _Net()
    sd = copy.deepcopy(net.state_dict())
    net.conv1 = FFTConv2d.from_conv(net.conv1)
    assert list(net.state_dict()) == list(sd)
    plain = _Net()
    plain.load_state_dict(net.state_dict())  # an FFT checkpoint loads into the plain model
    fresh = _Net()
    fresh.conv1 = FFTConv2d.from_conv(fresh.conv1)
    fresh.load_state_dict(sd)  # and a plain checkpoint into the swapped one
    x = torch.randn(2, 3, 16, 16)
    assert _rel(fresh(x), plain(x)) < 1e-5


def test_optimizer_keeps_working_after_swap_and_matches_direct_training() -> None:
    torch.manual_seed(2)
    direct = _Net()
    swapped = copy.deepcopy(direct)
    opt_d = torch.optim.SGD(direct.parameters(), lr=0.1, momentum=0.9)
    opt_s = torch.optim.SGD(swapped.parameters(), lr=0.1, momentum=0.9)  # built BEFORE the swap
    w_before = swapped.conv1.weight
    w_init = w_before.detach().clone()
    swapped.conv1 = FFTConv2d.from_conv(swapped.conv1)
    swapped.conv2 = FFTConv2d.from_conv(swapped.conv2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    for _ in range(3):
        for net, opt in ((direct, opt_d), (swapped, opt_s)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    assert swapped.conv1.weight is w_before  # the optimizer updated the very same tensor
    assert not torch.allclose(w_before.detach(), w_init)  # and it moved
    for (n, p), (_, q) in zip(direct.named_parameters(), swapped.named_parameters()):
        assert _rel(q.detach(), p.detach()) < 1e-4, n


def _count_spectra(monkeypatch) -> list[int]:
    calls = [0]
    real = nn_fftconv.kernel_spectrum

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(nn_fftconv, "kernel_spectrum", counting)
    return calls


def test_eval_cache_reused_and_invalidated(monkeypatch) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 5, padding=2)
    fft = FFTConv2d.from_conv(conv).eval()
    calls = _count_spectra(monkeypatch)
    x = torch.randn(2, 3, 12, 12)
    y1 = fft(x)
    y2 = fft(x)
    assert calls[0] == 1 and torch.equal(y1, y2)  # cached
    fft(torch.randn(2, 3, 10, 10))
    assert calls[0] == 2  # other input size: other grid
    fft(x)
    assert calls[0] == 3  # (one entry per layer)
    # in-place update through the optimizer (bumps _version)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    assert _rel(fft(x), conv(x)) < 1e-5 and calls[0] == 4
    # untracked write through .data (does NOT bump _version): caught by the equality check
    v = conv.weight._version
    conv.weight.data.mul_(-1.0)
    assert conv.weight._version == v
    assert _rel(fft(x), conv(x)) < 1e-5 and calls[0] == 5
    # replaced storage
    conv.weight.data = torch.randn_like(conv.weight)
    assert _rel(fft(x), conv(x)) < 1e-5 and calls[0] == 6
    # dtype change (module.double()): new spectrum in float64
    fft.double()
    xd = x.double()
    assert _rel(fft(xd), F.conv2d(xd, conv.weight, conv.bias, padding=2)) < 1e-12 and calls[0] == 7
    fft.invalidate_cache()
    fft(xd)
    assert calls[0] == 8


def test_no_cache_in_training_mode(monkeypatch) -> None:
    fft = FFTConv2d(3, 4, 3, padding=1).train()
    calls = _count_spectra(monkeypatch)
    x = torch.randn(1, 3, 8, 8)
    fft(x)
    fft(x)
    assert calls[0] == 0  # training computes the spectrum inside the autograd Function


def test_eval_cache_under_inference_mode_then_grad() -> None:
    """A spectrum cached under inference_mode is not reused where autograd must save it."""
    torch.manual_seed(4)
    fft = FFTConv2d(2, 3, 3, padding=1).eval()
    x = torch.randn(1, 2, 9, 9)
    with torch.inference_mode():
        fft(x)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fft(xg).sum(), (xg,))
    xr = x.clone().requires_grad_(True)
    (r,) = torch.autograd.grad(F.conv2d(xr, fft.weight, fft.bias, padding=1).sum(), (xr,))
    assert _rel(g, r) < 1e-5


def test_conv1d_swap() -> None:
    torch.manual_seed(5)
    conv = nn.Conv1d(4, 6, 9, stride=2, padding="valid", groups=2)
    fft = FFTConv1d.from_conv(conv)
    x = torch.randn(3, 4, 40)
    assert fft.weight is conv.weight and _rel(fft(x), conv(x)) < 1e-5
    assert _rel(fft.eval()(x), conv(x)) < 1e-5
    assert _rel(fft(x[0]), conv(x[0])) < 1e-5  # unbatched, cached path
    assert type(fft.to_conv()) is nn.Conv1d
    assert isinstance(fft_module_for(nn.Conv1d(1, 1, 3)), FFTConv1d)


def test_constructor_matches_conv2d_init() -> None:
    torch.manual_seed(6)
    a = nn.Conv2d(3, 4, 5, padding="same", bias=False)
    torch.manual_seed(6)
    b = FFTConv2d(3, 4, 5, padding="same", bias=False)
    assert torch.equal(a.weight, b.weight) and b.bias is None
    x = torch.randn(1, 3, 11, 11)
    assert _rel(b(x), a(x)) < 1e-5
    assert "fft=True" in repr(b)


def test_pruned_layer_is_supported() -> None:
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    fft = FFTConv2d.from_conv(conv)
    x = torch.randn(2, 3, 8, 8)
    assert _rel(fft(x), conv(x)) < 1e-5
    assert fft.weight_orig is conv.weight_orig


def test_unsupported_layers_raise() -> None:
    conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    assert "parametrized" in unsupported_reason(conv)
    with pytest.raises(TypeError, match="parametrized"):
        FFTConv2d.from_conv(conv)

    class Custom(nn.Conv2d):
        def forward(self, x):  # noqa: D102
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="overrides forward"):
        FFTConv2d.from_conv(Custom(1, 1, 3))
    with pytest.raises(TypeError, match="Conv"):
        FFTConv2d.from_conv(nn.Conv1d(1, 1, 3))
    with pytest.raises(TypeError):
        FFTConv2d.from_conv(nn.ConvTranspose2d(1, 1, 3))
    with pytest.raises(TypeError, match="cache_spectrum"):
        FFTConv2d(1, 1, 3, cache_spectrum="yes")  # type: ignore[arg-type]


def test_timing_helper_leaves_model_untouched() -> None:
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 3, 5, padding=2)
    w = conv.weight.detach().clone()
    state = torch.get_rng_state()
    t = time_direct_vs_fft(conv, (2, 2, 16, 16), train=True, repeats=2)
    assert t.direct_s > 0 and t.fft_s > 0 and t.speedup > 0
    assert conv.weight.grad is None and torch.equal(conv.weight, w) and conv.training
    assert torch.equal(torch.get_rng_state(), state)
    t = time_direct_vs_fft(FFTConv2d.from_conv(conv), (2, 2, 16, 16), train=False, repeats=1, warmup=0)
    assert t.fft_s > 0
    with pytest.raises(ValueError, match="repeats"):
        time_direct_vs_fft(conv, (1, 2, 8, 8), train=False, repeats=0)


def test_functional_spectrum_matches_module_cache() -> None:
    """The module's cached path goes through ops.kernel_spectrum: same numbers as uncached."""
    torch.manual_seed(9)
    fft = FFTConv2d(4, 4, 7, padding=3, groups=4).eval()
    x = torch.randn(2, 4, 20, 20)
    cached = fft(x)
    direct = ops_fftconv.fft_conv2d(x, fft.weight, fft.bias, 1, 3, 1, 4)
    assert torch.allclose(cached, direct, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_module_and_autocast() -> None:
    torch.manual_seed(10)
    conv = nn.Conv2d(4, 8, 9, padding=4).cuda()
    fft = FFTConv2d.from_conv(conv)
    x = torch.randn(2, 4, 32, 32, device="cuda")
    assert _rel(fft(x), conv(x)) < 1e-4
    fft.eval()
    with torch.autocast("cuda", dtype=torch.float16):
        y = fft(x)
        r = conv(x)
    assert y.dtype == r.dtype == torch.float16
    assert _rel(y.float(), conv(x)) < 2e-2


def test_timing_stops_early_on_a_decisive_gap() -> None:
    calls = [0]

    def count(mod, *_):
        calls[0] += type(mod) is nn.Conv2d  # the FFT twin shares (a copy of) the hooks

    big = nn.Conv2d(4, 4, 31, padding=15)
    big.register_forward_hook(count)
    t = time_direct_vs_fft(big, (2, 4, 64, 64), train=True, repeats=20, warmup=1)
    assert t.speedup >= 4.0 and calls[0] == 3  # warm-up + two timed rounds, not 21
    small = nn.Conv2d(2, 2, 3, padding=1)
    small.register_forward_hook(count)
    calls[0] = 0
    time_direct_vs_fft(small, (1, 2, 8, 8), train=False, repeats=5, warmup=1, decisive_ratio=None)
    assert calls[0] == 6
