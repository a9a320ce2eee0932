"""Training pipeline end to end: quickstart accuracy, CLI, multirun, resume, DDP, bad input."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg, make_image_folder, run_cli, run_train

from lightning_struct.data import DigitsDataModule, ImageFolderDataModule
from lightning_struct.models import ImageClassifier, digits_cnn

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_quickstart_reaches_95_percent_under_2_minutes(tmp_path):
    t0 = time.perf_counter()
    metrics = run_train(["recipe=quickstart", "logger=csv", *QUIET], tmp_path)
    wall = time.perf_counter() - t0
    assert metrics["val/acc"] >= 0.95, metrics
    assert wall < 120, f"quickstart took {wall:.1f}s"
    rows = _read_csv(tmp_path / "metrics.csv")
    assert "val/acc" in rows[0]
    val = [float(r["val/acc"]) for r in rows if r["val/acc"]]
    assert len(val) == 8 and max(val) >= 0.95
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_cli_default_config_fast_dev_run(tmp_path):
    """The default config (W&B logger, offline without a key) from the installed command."""
    res = run_cli(["train", "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lightning-struct train finished" in res.stdout
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline W&B run written"


@pytest.mark.slow
def test_cli_multirun_two_values(tmp_path):
    res = run_cli(
        [
            "train", "-m", "seed=1,2", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=2", "test=false", "logger=csv",
        ],
        cwd=tmp_path,
    )
    # no hydra.sweep.dir override: the default sweep dir must resolve by itself (it once did not)
    assert res.returncode == 0, res.stderr[-3000:]
    (multi,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    for job in ("0", "1"):
        assert (multi / job / "metrics.csv").is_file(), job
    assert "#0 : seed=1" in res.stdout + res.stderr and "#1 : seed=2" in res.stdout + res.stderr


@pytest.mark.slow
def test_cli_cfg_job_and_info(tmp_path):
    res = run_cli(["train", "recipe=quickstart", "--cfg", "job"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "task_name: quickstart" in res.stdout and "DigitsDataModule" in res.stdout
    info = run_cli(["train", "--info", "searchpath"], cwd=tmp_path)
    assert info.returncode == 0 and "Config search path" in info.stdout


@pytest.mark.slow
def test_cli_unknown_recipe_fails_clearly(tmp_path):
    res = run_cli(["train", "recipe=no_such_recipe"], cwd=tmp_path)
    assert res.returncode != 0
    err = res.stdout + res.stderr
    assert "recipe/no_such_recipe" in err and "quickstart" in err  # lists what exists


def test_misspelt_recipe_lists_nested_recipes_with_a_close_match():
    from lightning_struct.app.train import _unknown_recipe

    msg = _unknown_recipe(["recipe=quickstrat"])
    assert msg is not None and "Did you mean 'quickstart'" in msg and "wen2017/resnet50_force" in msg
    assert "'wen2017/digits_force'" in (_unknown_recipe(["recipe=wen2017/digit_force"]) or "")
    assert _unknown_recipe(["recipe=quickstart", "seed=1"]) is None


def test_misspelt_key_names_the_close_keys():
    from lightning_struct.app.train import _unknown_key

    msg = _unknown_key(["recipe=quickstart", "trainer.max_epoch=3"])
    assert msg is not None and "Did you mean 'trainer.max_epochs'" in msg and "+trainer.max_epoch=3" in msg
    assert "'data.batch_size'" in (_unknown_key(["data.batchsize=8"]) or "")
    assert _unknown_key(["recipe=quickstart", "trainer.max_epochs=3", "seed=1,2"]) is None  # sweeps: Hydra's
    assert _unknown_key(["recipe=quickstart", "+trainer.max_epoch=3"]) is None


@pytest.mark.slow
def test_cli_misspelt_key_exits_2_with_the_suggestion(tmp_path):
    res = run_cli(["train", "recipe=quickstart", "trainer.max_epoch=3"], cwd=tmp_path)
    assert res.returncode == 2 and "Did you mean 'trainer.max_epochs'" in res.stderr
    assert not (tmp_path / "logs").exists(), "nothing was run"


def test_converted_checkpoint_loads_with_load_from_checkpoint(tmp_path):
    import lightning.pytorch as pl

    from lightning_struct import convert
    from lightning_struct.models import load_classifier
    from lightning_struct.nn.lowrank import LowRankLinear
    from lightning_struct.surgery.spec import SPEC_KEY, get_spec

    torch.manual_seed(0)
    model = ImageClassifier(digits_cnn(num_classes=10, image_size=16), num_classes=10)
    convert(model, "lowrank", ratio=0.25)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    path = tmp_path / "converted.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt[SPEC_KEY] = get_spec(model)  # what ConversionCheckpoint writes
    torch.save(ckpt, path)

    loaded = ImageClassifier.load_from_checkpoint(path, net=digits_cnn(num_classes=10, image_size=16))
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    x = torch.randn(3, 1, 16, 16)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    ckpt["run_config"] = {"model": {"num_classes": 10, "net": {"_target_": "lightning_struct.models.digits_cnn", "num_classes": 10, "image_size": 16}}}
    torch.save(ckpt, path)
    assert torch.equal(load_classifier(path).eval()(x), model(x))


def test_missing_data_root_fails_before_training(tmp_path):
    from lightning_struct.app.train import train

    cfg = compose_cfg(["data=imagefolder", "logger=none"], tmp_path)
    with pytest.raises(ValueError, match=r"data\.root"):
        train(cfg)


def test_missing_ckpt_path_fails_before_anything_is_built(tmp_path, monkeypatch):
    import lightning_struct.app.train as app_train

    cfg = compose_cfg(["recipe=quickstart", "logger=none", f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path)
    built = []
    monkeypatch.setattr(app_train, "_instantiate_group", lambda *a, **k: built.append(a) or [])
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*nope\.ckpt.*no such checkpoint"):
        app_train.train(cfg)
    assert not built


def test_nonexistent_and_empty_data_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(tmp_path / "nope")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataModule(tmp_path / "empty")
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataModule(tmp_path / "noimg")


def test_wrong_num_classes_vs_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"model.num_classes=5 .* 10 classes"):
        run_train(["logger=none", "model.num_classes=5", "trainer.fast_dev_run=true", *QUIET], tmp_path)
    root = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=2, size=16)
    with pytest.raises(ValueError, match=r"3 class folders but the model expects 4 classes: pass model.num_classes=3"):
        ImageFolderDataModule(root, num_classes=4)


def test_net_output_mismatch_is_caught(tmp_path):
    import lightning.pytorch as pl

    model = ImageClassifier(digits_cnn(num_classes=7), num_classes=10)
    trainer = pl.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"logits of shape \(\d+, 7\)"):
        trainer.fit(model, DigitsDataModule())


def test_digits_split_is_deterministic_and_disjoint():
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    n = len(a.train_set) + len(a.val_set) + len(a.test_set)
    assert n == 1797
    assert a.train_set.tensors[0].shape[1:] == (1, 16, 16)
    c = DigitsDataModule(seed=4)
    c.setup()
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])


@pytest.mark.slow
def test_resume_from_last_ckpt_continues(tmp_path):
    base = ["recipe=quickstart", "logger=csv", "test=false", *QUIET]
    run_train([*base, "trainer.max_epochs=1"], tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 0
    steps_one_epoch = ckpt["global_step"]
    run_train([*base, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "b")
    ckpt2 = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt2["epoch"] == 1 and ckpt2["global_step"] == 2 * steps_one_epoch
    rows = _read_csv(tmp_path / "b" / "metrics.csv")
    epochs = {int(r["epoch"]) for r in rows if r.get("val/acc")}
    assert epochs == {1}, "the resumed run must log epoch 1 only (epoch 0 came from the checkpoint)"


@pytest.mark.slow
def test_imagefolder_one_epoch(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=6, size=40)
    metrics = run_train(
        [
            "data=imagefolder",
            f"data.root={root}",
            "data.image_size=32",
            "data.batch_size=6",
            "data.num_workers=0",
            "model=torchvision",
            "model.net.name=resnet18",
            "model.num_classes=3",
            "trainer.max_epochs=1",
            "logger=csv",
            *QUIET,
        ],
        tmp_path / "run",
    )
    assert "val/acc" in metrics and "test/acc" in metrics
    dm = ImageFolderDataModule(root, image_size=32, batch_size=4, num_workers=0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and dm.num_classes == 3


@pytest.mark.slow
def test_ddp_sim_fast_dev_run(tmp_path):
    metrics = run_train(["trainer=ddp_sim", "trainer.fast_dev_run=true", "logger=csv", "test=false", *QUIET], tmp_path)
    assert "train/loss" in metrics or "val/acc" in metrics


@pytest.mark.slow
def test_checkpoint_rebuilds_net_from_run_config(tmp_path):
    from lightning_struct.models import load_classifier

    run_train(["recipe=quickstart", "logger=none", "test=false", "trainer.max_epochs=1", *QUIET], tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # plain hyper-parameters: safe loading works
    assert ckpt["run_config"]["model"]["net"]["_target_"] == "lightning_struct.models.digits_cnn"
    model = load_classifier(last)
    ref = ckpt["state_dict"]
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="run_config"):
        load_classifier({"state_dict": {}, "hyper_parameters": {}})


@pytest.mark.slow
def test_cli_sigterm_then_resume_into_the_same_run(tmp_path):
    """SIGTERM mid-fit: exit 143, a resume command; that command continues the same run dir, CSV and W&B id."""
    import os
    import shlex
    import signal
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "lightning-struct"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # more epochs than the signal lets it run; nothing else differs from the README's quickstart
    args = ["train", "recipe=quickstart", "trainer.max_epochs=200", "logger=[csv,wandb]"]
    proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("logs/quickstart/runs/*/checkpoints/last.ckpt")):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    run = next(tmp_path.glob("logs/quickstart/runs/*"))
    resume = [line for line in err.splitlines() if line.startswith("resume with: ")]
    assert resume, err[-3000:]
    cmd = shlex.split(resume[0].removeprefix("resume with: "))
    assert cmd[:2] == ["lightning-struct", "train"] and cmd[-1] == f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    rows_before = len(_read_csv(run / "metrics.csv"))
    wandb_ids = {p.name.split("-")[-1] for p in (run / "wandb").glob("offline-run-*")}

    # the printed command, with a smaller epoch budget so it ends soon
    done = run_cli([*cmd[1:], f"trainer.max_epochs={stopped['epoch'] + 2}"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.glob("logs/quickstart/runs/*")] == [run.name], "resumed into the same run dir"
    rows = _read_csv(run / "metrics.csv")
    assert len(rows) > rows_before and any(r.get("test/acc") for r in rows) and any(r.get("train/acc") for r in rows)
    assert {p.name.split("-")[-1] for p in (run / "wandb").glob("offline-run-*")} == wandb_ids, "same W&B run id"
    assert "best_model_score will not be reloaded" not in done.stderr + done.stdout


@pytest.mark.slow
def test_ddp_sim_csv_keeps_train_and_test_metrics(tmp_path):
    run_train(["recipe=quickstart", "trainer=ddp_sim", "logger=csv", "trainer.max_epochs=1", *QUIET], tmp_path)
    rows = _read_csv(tmp_path / "metrics.csv")
    header = set(rows[0])
    assert {"train/acc", "val/acc", "test/acc", "lr-Adam"} <= header
    assert any(r["train/acc"] for r in rows) and any(r["test/acc"] for r in rows)


def test_csv_logger_widens_the_file_written_by_another_writer(tmp_path):
    from lightning_struct.loggers import CSVLogger

    a = CSVLogger(tmp_path, name="", version="")
    a.log_metrics({"train/loss": 1.0}, step=0)
    a.save()
    b = CSVLogger(tmp_path, name="", version="")  # another process (ddp_spawn's test stage) or a resume
    b.log_metrics({"test/acc": 0.5}, step=1)
    b.save()
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [r["train/loss"] for r in rows] == ["1.0", ""] and [r["test/acc"] for r in rows] == ["", "0.5"]


def test_multirun_summary_lists_the_varying_overrides():
    from lightning_struct.app.train import multirun_summary

    jobs = [
        (["recipe=q", "callbacks.force.strength=0.0"], {"val/acc": 0.9, "force/total_rank_fraction@0.95": 0.8}, "runs/0", "force/total_rank_fraction@0.95"),
        (["recipe=q", "callbacks.force.strength=0.001"], {"val/acc": 0.85, "force/total_rank_fraction@0.95": 0.5}, "runs/1", "force/total_rank_fraction@0.95"),
    ]
    text = multirun_summary(jobs).splitlines()
    assert text[0] == "lightning-struct train: 2 jobs (optimized_metric=force/total_rank_fraction@0.95)"
    assert text[1].split() == ["job", "overrides", "force/total_rank_fraction@0.95", "val/acc", "run", "dir"]
    assert text[2].split() == ["0", "callbacks.force.strength=0.0", "0.8000", "0.9000", "runs/0"]
    assert "recipe=q" not in text[3]


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    from omegaconf import OmegaConf

    import lightning_struct.app.train as t

    n0 = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(t.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    cpu = {"trainer": {"accelerator": "cpu", "devices": 1}}
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(t, "_other_busy_cores", lambda: 3)
        t._set_cpu_threads(OmegaConf.create({**cpu, "threads": "auto"}))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(4)
        monkeypatch.setattr(t, "_other_busy_cores", lambda: 0)
        t._set_cpu_threads(OmegaConf.create({**cpu, "threads": "auto"}))
        assert torch.get_num_threads() == 4
        t._set_cpu_threads(OmegaConf.create({**cpu, "threads": 2}))
        assert torch.get_num_threads() == 2
        torch.set_num_threads(4)
        t._set_cpu_threads(OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 2}, "threads": 1}))
        assert torch.get_num_threads() == 4, "multi-process runs: Lightning splits the cores itself"
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        t._set_cpu_threads(OmegaConf.create({**cpu, "threads": 1}))
        assert torch.get_num_threads() == 4, "an explicit OMP_NUM_THREADS wins"
        with pytest.raises(ValueError, match="threads"):
            monkeypatch.delenv("OMP_NUM_THREADS")
            t._set_cpu_threads(OmegaConf.create({**cpu, "threads": 0}))
    finally:
        torch.set_num_threads(n0)
