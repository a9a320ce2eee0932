"""FFTConvolution inside real Lightning loops: swaps, numerics, timing decisions, stages, revert,
logging, checkpoints, DDP, bad arguments."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyCNN, quiet_trainer, tiny_loader
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader

from lightning_struct import FFTConvolution
from lightning_struct.callbacks import fftconv as cb_module
from lightning_struct.nn import FFTConv2d


@pytest.fixture(autouse=True)
def _one_thread():
    """Decisions compare two implementations on one thread: other processes on the machine then
    slow both alike, so the comparison stays stable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# models (module level: picklable for ddp_spawn)
# ------------------------------------------------------------------------------------------
class BigSmallNet(nn.Module):
    """One conv where FFT clearly wins (31x31 on 64x64) and one where it clearly loses (3x3 on 8x8)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Conv2d(2, 4, 31, padding=15)
        self.bn = nn.BatchNorm2d(4)
        self.small = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.big(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 8)
        x = torch.relu(self.small(x))
        return self.fc(x.mean((2, 3)))


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5, padding=2)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.conv3 = nn.Conv2d(6, 6, 3, padding="same", groups=6, padding_mode="circular")
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class Module(TinyCNN):
    """The shared tiny classifier around ``SmallNet`` or ``BigSmallNet`` (SGD, momentum 0.9)."""

    def __init__(self, net: str = "small", lr: float = 0.1) -> None:
        super().__init__(net=SmallNet() if net == "small" else BigSmallNet(), lr=lr, momentum=0.9)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------
# policy="always": every selected layer swapped, training identical to direct convs
# ------------------------------------------------------------------------------------------
def test_always_swaps_all_and_training_matches_direct() -> None:
    pl.seed_everything(0)
    direct = Module()
    swapped = copy.deepcopy(direct)
    cb = FFTConvolution(policy="always")
    pl.seed_everything(1)
    quiet_trainer(max_epochs=2).fit(direct, tiny_loader(size=12, shuffle=True))
    pl.seed_everything(1)
    params_before = {n: p for n, p in swapped.named_parameters()}
    quiet_trainer(callbacks=[cb], max_epochs=2).fit(swapped, tiny_loader(size=12, shuffle=True))
    assert cb.swapped == ["net.conv1", "net.conv2", "net.conv3"]
    assert all(isinstance(getattr(swapped.net, f"conv{i}"), FFTConv2d) for i in (1, 2, 3))
    assert all(d.use_fft and math.isnan(d.direct_ms) for d in cb.decisions)
    # the very same Parameter objects were trained
    assert all(p is params_before[n] for n, p in swapped.named_parameters())
    a, b = _params(direct), _params(swapped)
    for n in a:
        rel = ((a[n] - b[n]).abs().max() / a[n].abs().max()).item()
        assert rel < 1e-5, n


def test_include_exclude_and_list_policy() -> None:
    model = Module()
    cb = FFTConvolution(policy="always", include="net.conv*", exclude="net.conv2")
    quiet_trainer(callbacks=[cb]).fit(model, tiny_loader(size=12))
    assert cb.swapped == ["net.conv1", "net.conv3"] and type(model.net.conv2) is nn.Conv2d
    model = Module()
    cb = FFTConvolution(policy=["net.conv2"])
    quiet_trainer(callbacks=[cb]).fit(model, tiny_loader(size=12))
    assert cb.swapped == ["net.conv2"] and isinstance(model.net.conv2, FFTConv2d)
    with pytest.raises(ValueError, match="net.nope"):
        quiet_trainer(callbacks=[FFTConvolution(policy=["net.nope"])]).fit(Module(), tiny_loader(size=12))


# ------------------------------------------------------------------------------------------
# policy="auto": the measured winner per layer
# ------------------------------------------------------------------------------------------
def test_auto_swaps_large_kernel_and_keeps_small_one(monkeypatch, tmp_path: Path) -> None:
    tables: list[tuple[str, list, list]] = []
    monkeypatch.setattr(
        cb_module, "log_table", lambda tr, key, cols, rows, step=None: tables.append((key, cols, rows))
    )
    scalars: dict[str, float] = {}
    monkeypatch.setattr(cb_module, "log_scalars", lambda tr, m, step=None: scalars.update(m))
    pl.seed_everything(0)
    model = Module(net="bigsmall", lr=0.01)
    cb = FFTConvolution(margin=1.1, repeats=3)
    trainer = quiet_trainer(callbacks=[cb], max_steps=2, logger=pl.loggers.CSVLogger(tmp_path, name="csv"))
    trainer.fit(model, tiny_loader(n=16, size=64, channels=2, batch_size=4))
    by_layer = {d.layer: d for d in cb.decisions}
    big, small = by_layer["net.big"], by_layer["net.small"]
    assert big.input_shapes == [(4, 2, 64, 64)] and small.input_shapes == [(4, 4, 8, 8)]
    assert big.use_fft and big.fft_ms * 1.1 <= big.direct_ms, big
    assert not small.use_fft and small.fft_ms * 1.1 > small.direct_ms, small
    assert isinstance(model.net.big, FFTConv2d) and type(model.net.small) is nn.Conv2d
    assert cb.swapped == ["net.big"]
    # logged: scalars per layer and one W&B table (rows = layers)
    assert scalars["fftconv/net.big/use_fft"] == 1.0 and scalars["fftconv/net.small/use_fft"] == 0.0
    assert scalars["fftconv/net.big/direct_ms"] == pytest.approx(big.direct_ms)
    assert scalars["fftconv/swapped_layers"] == 1.0
    key, cols, rows = tables[-1]
    assert (
        key == "fftconv/decisions" and "fft_ms" in cols and {r[1] for r in rows} == {"net.big", "net.small"}
    )


@pytest.mark.slow
def test_wandb_table_written_offline(tmp_path: Path) -> None:
    import json

    import wandb
    from lightning.pytorch.loggers import WandbLogger

    cb = FFTConvolution(policy="always")
    logger = WandbLogger(project="fftconv-test", save_dir=str(tmp_path), offline=True)
    try:
        quiet_trainer(callbacks=[cb], logger=logger, max_steps=1).fit(Module(), tiny_loader(size=12))
    finally:
        wandb.finish()
    tables = list(tmp_path.rglob("decisions*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["stage", "layer"]
    assert [r[1] for r in table["data"]] == ["net.conv1", "net.conv2", "net.conv3"]


def test_auto_leaves_rng_and_batchnorm_untouched() -> None:
    """The dry forward runs in eval mode and the RNG state is restored: the run is identical."""
    runs = []
    for callbacks in ([], [FFTConvolution(policy="auto", repeats=1, warmup=0, margin=1e9)]):
        pl.seed_everything(3)
        model = Module(net="bigsmall", lr=0.01)
        quiet_trainer(callbacks=callbacks, max_steps=3).fit(
            model, tiny_loader(n=24, size=32, channels=2, batch_size=4, shuffle=True)
        )
        runs.append((model.net.bn.running_mean.clone(), _params(model), torch.rand(1)))
    (bn0, p0, r0), (bn1, p1, r1) = runs
    assert torch.equal(bn0, bn1) and torch.equal(r0, r1)  # margin 1e9: nothing swapped, bit-identical
    for n in p0:
        assert torch.equal(p0[n], p1[n]), n


def test_stages_redecide_forward_only_and_revert() -> None:
    model = Module()
    cb = FFTConvolution(policy="auto", repeats=1, warmup=0, margin=1.0, revert_on_end=True)
    trainer = quiet_trainer(callbacks=[cb])
    trainer.fit(model, tiny_loader(size=12))
    assert {d.stage for d in cb.decisions} == {"fit"} and all(d.input_shapes for d in cb.decisions)
    assert cb.swapped == [] and all(
        type(m) is nn.Conv2d for m in model.net.modules() if isinstance(m, nn.Conv2d)
    )
    trainer.test(model, tiny_loader(size=12))
    assert {d.stage for d in cb.decisions} == {"test"}
    trainer.validate(model, tiny_loader(size=12))
    assert {d.stage for d in cb.decisions} == {"validate"}
    preds = trainer.predict(model, tiny_loader(size=12))
    assert {d.stage for d in cb.decisions} == {"predict"} and len(preds) == 4
    # manual revert of a kept swap
    cb2 = FFTConvolution(policy="always")
    quiet_trainer(callbacks=[cb2]).test(model, tiny_loader(size=12))
    assert isinstance(model.net.conv1, FFTConv2d)
    assert cb2.revert() == ["net.conv1", "net.conv2", "net.conv3"] and type(model.net.conv1) is nn.Conv2d


def test_input_shapes_argument_and_unsupported_layers() -> None:
    model = Module()
    model.net.conv2 = parametrizations.weight_norm(model.net.conv2)
    with pytest.raises(ValueError, match="net.conv2.*parametrized"):
        quiet_trainer(callbacks=[FFTConvolution(policy="always")]).fit(model, tiny_loader(size=12))
    cb = FFTConvolution(
        policy="auto",
        repeats=1,
        warmup=0,
        on_unsupported="skip",
        input_shapes={"net.conv1": (8, 1, 12, 12), "net.conv3": (8, 6, 6, 6)},
    )
    quiet_trainer(callbacks=[cb]).fit(model, tiny_loader(size=12))
    assert [d.layer for d in cb.decisions] == ["net.conv1", "net.conv3"]
    assert cb.decisions[0].input_shapes == [(8, 1, 12, 12)]


class DictBatchModule(Module):
    """Batches are dicts; the forward wants a (x, scale) pair: the default input_fn cannot know."""

    def forward(self, pair):  # type: ignore[override]
        x, scale = pair
        return self.net(x) * scale

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self((batch["image"], 1.0)), batch["label"])


class _DictData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = torch.randn(16, 1, 12, 12)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": i % 3}


def test_input_fn_for_custom_batches() -> None:
    loader = DataLoader(_DictData(), batch_size=4)
    with pytest.raises(RuntimeError, match="input_fn"):
        quiet_trainer(callbacks=[FFTConvolution(repeats=1, warmup=0)]).fit(DictBatchModule(), loader)
    cb = FFTConvolution(repeats=1, warmup=0, input_fn=lambda b: (b["image"], 1.0))
    quiet_trainer(callbacks=[cb]).fit(DictBatchModule(), loader)
    assert cb.decisions[0].input_shapes == [(4, 1, 12, 12)]


def test_checkpoint_of_swapped_model_loads_into_plain_model(tmp_path: Path) -> None:
    model = Module()
    cb = FFTConvolution(policy="always")
    trainer = quiet_trainer(tmp_path, [cb], enable_checkpointing=True)
    trainer.fit(model, tiny_loader(size=12))
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    plain = Module.load_from_checkpoint(ckpt)
    assert type(plain.net.conv1) is nn.Conv2d
    x = torch.randn(2, 1, 12, 12)
    model.eval()
    plain.eval()
    assert torch.allclose(model(x), plain(x), atol=1e-5)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if "FFTConvolution" in k)
    assert set(saved) == {"decisions"}  # what load_state_dict reads
    assert [d["layer"] for d in saved["decisions"] if d["use_fft"]] == ["net.conv1", "net.conv2", "net.conv3"]
    fresh = FFTConvolution()
    fresh.load_state_dict(saved)
    assert [d.layer for d in fresh.decisions] == ["net.conv1", "net.conv2", "net.conv3"]
    assert [d.reason for d in fresh.decisions] == [d.reason for d in cb.decisions] and fresh.swapped == []


# ------------------------------------------------------------------------------------------
# DDP: rank 0 decides, every rank swaps the same layers, weights stay identical
# ------------------------------------------------------------------------------------------
class SaveRank(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, FFTConvolution))
        payload = {
            "weights": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "swapped": list(cb.swapped),
            "decisions": [(d.layer, d.use_fft, d.direct_ms, d.fft_ms) for d in cb.decisions],
            "types": {n: type(m).__name__ for n, m in pl_module.named_modules()},
        }
        torch.save(payload, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_spawn_two_processes_identical(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = Module(net="bigsmall", lr=0.01)
    init = _params(model)
    cb = FFTConvolution(policy="auto", repeats=2, warmup=1)
    trainer = quiet_trainer(
        callbacks=[cb, SaveRank(str(tmp_path))],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=1,
        use_distributed_sampler=True,
    )
    trainer.fit(model, tiny_loader(n=16, size=64, channels=2, batch_size=4))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["decisions"] == r1["decisions"]  # rank 0's measurements, broadcast
    assert r0["swapped"] == r1["swapped"] and "net.big" in r0["swapped"]
    assert r0["types"] == r1["types"] and r0["types"]["net.big"] == "FFTConv2d"
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert not torch.equal(r0["weights"]["net.big.weight"], init["net.big.weight"])


# ------------------------------------------------------------------------------------------
# bad arguments fail at construction
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, err, fragment",
    [
        ({"policy": "sometimes"}, ValueError, "policy='sometimes'"),
        ({"policy": []}, TypeError, "policy"),
        ({"policy": [3]}, TypeError, "policy"),
        ({"policy": ["a"], "include": "b"}, ValueError, "include"),
        ({"margin": 0.9}, ValueError, "margin=0.9"),
        ({"margin": "x"}, ValueError, "margin"),
        ({"repeats": 0}, ValueError, "repeats=0"),
        ({"warmup": -1}, ValueError, "warmup=-1"),
        ({"stages": ["train"]}, ValueError, "stages"),
        ({"on_unsupported": "ignore"}, ValueError, "on_unsupported"),
        ({"include": 5}, TypeError, "include"),
        ({"input_fn": 3}, TypeError, "input_fn"),
        ({"revert_on_end": "yes"}, TypeError, "revert_on_end"),
    ],
)
def test_bad_arguments(kwargs, err, fragment) -> None:
    with pytest.raises(err, match=fragment):
        FFTConvolution(**kwargs)
