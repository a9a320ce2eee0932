"""``lightning-struct train``: the Hydra training application.

The config root is ``conf/`` (``config.yaml`` + groups); experiment configs in ``recipes/``
form the ``recipe`` group (``recipe=quickstart``, ``recipe=wen2017/resnet50_force``). Both
directories ship inside the wheel; see :mod:`lightning_struct._resources`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_struct._resources import config_dir, recipes_dir
from lightning_struct.app.resume import (
    register_resolvers,
    resume_command,
    run_dir_of_checkpoint,
    wandb_run_id,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- recipes
def _package_header(path: Path) -> str | None:
    """The ``# @package X`` header of a YAML file (Hydra's convention), if any."""
    with path.open() as fh:
        for line in fh:
            s = line.strip()
            if not s:
                continue
            if not s.startswith("#"):
                return None
            body = s.lstrip("#").strip()
            if body.startswith("@package"):
                return body.split(None, 1)[1].strip()
    return None


def _is_wandb_sweep(node: DictConfig) -> bool:
    """A W&B sweep file (``wandb sweep FILE``): top-level ``program``/``command``, ``method``, ``parameters``."""
    return "method" in node and "parameters" in node and ("program" in node or "command" in node)


def register_recipes(root: Path | None = None) -> list[str]:
    """Register every ``recipes/**/*.yaml`` as an option of the Hydra group ``recipe``.

    The recipes live outside the config root (they are the user-facing part of the project), so
    they are put in Hydra's ``ConfigStore`` under ``recipe/<relative path without .yaml>``, keeping
    their ``# @package`` header (default ``_global_``) and their own defaults lists. W&B sweep
    specs kept beside them are skipped. Returns the recipe names (``wen2017/resnet50_force``).
    """
    from hydra.core.config_store import ConfigStore

    root = recipes_dir() if root is None else root
    cs = ConfigStore.instance()
    names = []
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root).with_suffix("")
        node = OmegaConf.load(path)
        if not isinstance(node, DictConfig):
            raise ValueError(f"recipe {path} must be a YAML mapping, got a list")
        if _is_wandb_sweep(node):  # W&B sweep specs live beside the recipes but are not Hydra configs
            continue
        package = _package_header(path) or "_global_"
        # recipes/wen2017/x.yaml -> group recipe/wen2017, option x: selected as recipe=wen2017/x
        group = "/".join(["recipe", *rel.parts[:-1]])
        cs.store(group=group, name=rel.name, node=node, package=package, provider="lightning-struct")
        names.append(rel.as_posix())
    return names


# --------------------------------------------------------------------------- W&B offline
def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _wandb_reachable(timeout: float = 3.0) -> bool:
    import socket

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


def configure_wandb_mode() -> str:
    """Make W&B never prompt and never block.

    An explicit ``WANDB_MODE`` is respected. Otherwise, without an API key, or with a key but no
    route to the W&B server, runs are written offline. Returns the mode in effect.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if not _wandb_key_available():
        reason = "no W&B API key (WANDB_API_KEY / wandb login)"
    elif not _wandb_reachable():
        reason = "the W&B server is not reachable"
    else:
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    log.info("W&B runs offline: %s. Upload later with `wandb sync <run dir>`.", reason)
    return "offline"


# --------------------------------------------------------------------------- instantiation
def _instantiate_group(cfg: DictConfig | None, what: str) -> list[Any]:
    from hydra.utils import instantiate

    out: list[Any] = []
    if not cfg:
        return out
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{what} config must be a mapping of name -> {{_target_: ...}}, got {type(cfg).__name__}")
    for name, conf in cfg.items():
        if conf is None:  # disabled with `callbacks.<name>=null`
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ValueError(f"{what}.{name} has no _target_ (got {OmegaConf.to_yaml(conf).strip()!r})")
        out.append(instantiate(conf))
    return out


def _resolved_container(cfg: DictConfig) -> dict[str, Any]:
    cfg = cfg.copy()
    with_hydra = "hydra" in cfg
    if with_hydra:
        OmegaConf.set_struct(cfg, False)
        cfg.pop("hydra")
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _check_required(cfg: DictConfig) -> None:
    """Fail before anything is built when a mandatory key (``???``) was not given."""
    body = {k: v for k, v in cfg.items_ex(resolve=False) if k != "hydra"}
    missing = sorted(OmegaConf.missing_keys(OmegaConf.create(body)))
    if missing:
        hints = {"data.root": "data.root=/path/to/imagenet (holding train/<class>/* and val/<class>/*)"}
        shown = "; ".join(hints.get(k, f"{k}=...") for k in missing)
        raise ValueError(f"missing required config value(s) {missing}: pass {shown}")


def _other_busy_cores(samples: int = 5) -> int:
    """How many cores other processes keep busy now (Linux: runnable tasks in /proc/loadavg, minus us)."""
    import statistics
    import time

    counts = []
    for _ in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        counts.append(max(0, running - 1))
        time.sleep(0.01)
    return int(statistics.median_low(counts))


def _set_cpu_threads(cfg: DictConfig) -> None:
    """``threads=auto``: a single-process CPU run uses the cores that are free, not all of them.

    On a 2-core machine the quickstart takes 16 s with 2 threads when idle, but 32 s with 2 and
    20 s with 1 thread when another process keeps a core busy (README, quickstart): intra-op threads
    that share a core with someone else wait on each other at every op. ``auto`` counts the
    cores other processes are using at start and leaves them alone; an integer sets the count;
    ``null`` keeps torch's default. An explicit ``OMP_NUM_THREADS`` always wins.
    """
    import torch

    choice = cfg.get("threads", "auto")
    trainer = cfg.get("trainer") or {}
    accel = str(trainer.get("accelerator", "auto"))
    on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())
    single = str(trainer.get("devices", 1)) in ("1", "auto") and trainer.get("num_nodes", 1) in (1, None)
    if choice is None or os.environ.get("OMP_NUM_THREADS") or not on_cpu or not single:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if choice == "auto":
        busy = _other_busy_cores()
        n = max(1, min(torch.get_num_threads(), cores - busy))
        why = f"{cores} cores, {busy} busy with other processes"
    else:
        from lightning_struct._checks import check_int

        n = int(check_int(choice, "threads", "lightning-struct train", minimum=1))  # type: ignore[arg-type]
        why = "threads=" + str(choice)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    log.info("CPU threads: %d (%s; set threads=N or OMP_NUM_THREADS to choose)", n, why)


class _DropTips(logging.Filter):
    """Lightning's advertisement lines ("Tip: ... try installing ...") are not about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _one_log_path() -> None:
    """Every Lightning message printed once, and also written to the run's log file.

    Under Hydra the root logger has a console and a file handler; Lightning adds a console handler
    of its own when it is imported first, and each line then shows twice. Lightning's own handlers
    are removed when the root logger has handlers, so its lines go through Hydra's (once, and
    into ``<run>/<task_name>.log``). Lightning's deprecation note on ``LeafSpec`` (its code, not
    the user's) is silenced.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True
        lg.addFilter(_DropTips())
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate data, model, callbacks, loggers and trainer from ``cfg``; fit and test.

    Returns the final ``trainer.callback_metrics`` as floats (fit metrics, then test metrics).
    """
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    _check_required(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(str(ckpt_path)).is_file():
        # before the data and model are built: a typo must not cost the set-up time
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file (give a path to a .ckpt, e.g. <run>/checkpoints/last.ckpt)")
    _check_export_section(cfg.get("export"))
    init_ckpt = cfg.get("init_ckpt")
    if init_ckpt and not Path(str(init_ckpt)).is_file():
        raise FileNotFoundError(
            f"init_ckpt={init_ckpt!r}: no such file (a lightning-struct or Lightning checkpoint, or a state dict)"
        )
    _one_log_path()
    _set_cpu_threads(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("logger") and cfg.logger.get("wandb"):
        mode = configure_wandb_mode()
        if mode in ("offline", "dryrun", "disabled"):  # the logged config says what really happened
            from omegaconf import open_dict

            with open_dict(cfg):
                cfg.logger.wandb.offline = True

    _reattach_wandb(cfg, ckpt_path)

    datamodule = instantiate(cfg.data)
    if init_ckpt and OmegaConf.select(cfg, "model.net.weights"):
        # the start is init_ckpt: no reason to fetch pretrained weights only to overwrite them
        log.info("init_ckpt given: model.net.weights=%s is not loaded", OmegaConf.select(cfg, "model.net.weights"))
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.model.net.weights = None
    model = instantiate(cfg.model)
    if init_ckpt:  # weights only (ckpt_path= resumes a whole run instead)
        from lightning_struct.models.init import load_init_weights

        print(load_init_weights(model, str(init_ckpt), strict=bool(cfg.get("init_strict", True))), flush=True)
    loggers = _instantiate_group(cfg.get("logger"), "logger")

    def build_callbacks(callbacks_cfg: Any) -> list[Any]:
        callbacks = _instantiate_group(callbacks_cfg, "callbacks")
        if not loggers:
            dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
            if dropped:
                log.info("logger=none: LearningRateMonitor dropped (it needs a logger)")
                callbacks = [c for c in callbacks if c not in dropped]
        return callbacks

    callbacks = build_callbacks(cfg.get("callbacks"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    hparams = _resolved_container(cfg)
    if hasattr(model, "run_config"):
        model.run_config = hparams
    for lg in loggers:
        lg.log_hyperparams(hparams)
    # the whole resolved config is logged above; Lightning's own logging of the module's and the
    # datamodule's init arguments would add them again as top-level duplicates (batch_size, ...)
    for obj in (model, datamodule):
        if hasattr(obj, "_log_hyperparams"):
            obj._log_hyperparams = False

    metrics: dict[str, float] = {}
    try:
        if cfg.get("train", True):
            if cfg.get("conversion"):
                # fit -> convert -> fine-tune with a fresh Trainer (see lightning_struct.callbacks.two_phase)
                from lightning_struct.app.two_phase import fit_convert_finetune_from_config

                trainer, extra = fit_convert_finetune_from_config(
                    cfg, model, datamodule, trainer, loggers, build_callbacks
                )
                metrics.update(extra)
            else:
                try:
                    trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
                except SystemExit:  # Lightning's answer to SIGTERM (exit 0) and Ctrl+C (exit 1)
                    _exit_interrupted(trainer)
                    raise
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1})
        if cfg.get("test", False):
            ckpt = trainer.checkpoint_callback
            best = ckpt.best_model_path if isinstance(ckpt, ModelCheckpoint) and ckpt.best_model_path else None
            if not cfg.get("train", True):
                best = cfg.get("ckpt_path")
            trainer.test(model=model, datamodule=datamodule, ckpt_path=best, weights_only=False)
            metrics.update(
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/") and torch.is_tensor(v)}
            )
        exported = _export_final(cfg, model, datamodule, trainer, metrics)
        _print_summary(trainer, metrics, exported)
    finally:
        for lg in loggers:
            if isinstance(lg, WandbLogger):
                import wandb

                wandb.finish()
    return metrics


def _reattach_wandb(cfg: DictConfig, ckpt_path: Any) -> None:
    """Resuming into the checkpoint's own run: log to the same W&B run (same id)."""
    from omegaconf import open_dict

    run = run_dir_of_checkpoint(ckpt_path)
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if run is None or not wandb_cfg or wandb_cfg.get("id"):
        return
    try:
        same_run = Path(str(cfg.paths.output_dir)).resolve() == run.resolve()
    except Exception:  # noqa: BLE001 - no Hydra runtime (a config composed by hand)
        same_run = False
    run_id = wandb_run_id(run) if same_run else None
    if run_id:
        with open_dict(cfg):
            wandb_cfg.id = run_id
            wandb_cfg.resume = "allow"
        log.info("resuming W&B run %s of %s", run_id, run)


def _exit_interrupted(trainer: Any) -> None:
    """A fit stopped by a signal: say where and how to resume, and exit 130 (SIGINT) / 143 (SIGTERM)."""
    from lightning_struct.callbacks.resume import Resumable

    stop = next((c.interruption for c in trainer.callbacks if isinstance(c, Resumable) and c.interruption), None)
    if stop is None:
        return
    if trainer.global_rank == 0:
        lines = [f"\nlightning-struct train stopped by {stop.signal} at epoch {stop.epoch}, global step {stop.global_step}"]
        if stop.checkpoint:
            try:
                from hydra.core.hydra_config import HydraConfig

                overrides = list(HydraConfig.get().overrides.task)
            except Exception:  # noqa: BLE001 - composed without the Hydra app
                overrides = []
            lines += [f"checkpoint : {stop.checkpoint}", f"resume with: {resume_command(overrides, stop.checkpoint)}"]
        print("\n".join(lines), file=sys.stderr, flush=True)
    raise SystemExit(stop.exit_code)


EXPORT_KEYS = ("format", "fold", "rtol", "evaluate", "batch")


def _check_export_section(section: Any) -> None:
    """Before anything is built: a typo in ``export:`` must not cost a training run."""
    if not section:
        return
    from lightning_struct._checks import check_choice, check_unknown
    from lightning_struct.deploy.export import FOLDS, FORMATS

    check_unknown(list(section), EXPORT_KEYS, "export key(s)", "export")
    if section.get("format") is not None:
        check_choice(section["format"], "export.format", FORMATS)
        if section["format"] == "onnx":
            from lightning_struct.deploy.runtime import require_onnx

            require_onnx("export.format=onnx")
    for f in section.get("fold") or []:
        check_choice(f, "export.fold", FOLDS)
    if section.get("evaluate") is not None:
        check_choice(section["evaluate"], "export.evaluate", ("test", "val"))


def _export_final(cfg: DictConfig, model: Any, datamodule: Any, trainer: Any, metrics: dict[str, float]) -> str | None:
    """The ``export:`` section: the final (tested) net exported to ``<run>/export/``, checked."""
    section = cfg.get("export")
    if not section or not section.get("format") or trainer.global_rank != 0:
        return None
    import torch

    from lightning_struct.app.export import SUFFIX, accuracy
    from lightning_struct.callbacks._log import run_dir
    from lightning_struct.deploy import export
    from lightning_struct.deploy.runtime import load_runner

    fmt = str(section.get("format"))
    net = getattr(model, "net", model).eval()
    shape = getattr(datamodule, "input_shape", None)
    if shape is None:
        raise ValueError("export: the data module has no input_shape; export the net yourself with lightning_struct.export")
    example = torch.randn(int(section.get("batch", 2)), *shape, generator=torch.Generator().manual_seed(0))
    path = Path(run_dir(trainer)) / "export" / f"model{SUFFIX[fmt]}"
    fold = section.get("fold", ["fft", "batchnorm"])
    result = export(net.cpu(), example, path, fmt, fold=list(fold) if fold else False, rtol=float(section.get("rtol", 1e-4)))
    line = f"{result.path}  (checked: max rel. error {result.max_rel_error:.1e})"
    split = section.get("evaluate")
    if split:
        datamodule.setup("test" if split == "test" else "fit")
        loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
        acc, n = accuracy(load_runner(result.path, fmt), loader)
        metrics[f"export/{split}_acc"] = acc
        line += f"; {split} accuracy in {'onnxruntime' if fmt == 'onnx' else fmt}: {acc:.4f} on {n} samples"
    return line


def _print_summary(trainer: Any, metrics: dict[str, float], exported: str | None = None) -> None:
    """Tell the user where the checkpoint, the logs and the W&B run are."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_struct.callbacks._log import run_dir
    from lightning_struct.callbacks.resume import last_checkpoint_path

    if trainer.global_rank != 0:
        return
    lines = []
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint):
        if ckpt.best_model_path:
            lines.append(f"best checkpoint : {ckpt.best_model_path}")
        last = ckpt.last_model_path
        if not last and ckpt.save_last:  # ddp_spawn: the workers' paths do not come back
            candidate = last_checkpoint_path(trainer)
            last = str(candidate) if candidate.is_file() else ""
        if last:
            lines.append(f"last checkpoint : {last}")
    lines.append(f"run directory   : {trainer.default_root_dir}")
    spectra = Path(run_dir(trainer)) / "spectra"  # where SpectralMonitor writes its PNGs
    if spectra.is_dir() and any(spectra.glob("*.png")):
        lines.append(f"spectra plots   : {spectra}")
    for lg in trainer.loggers:
        if isinstance(lg, CSVLogger):
            lines.append(f"csv metrics     : {Path(lg.log_dir) / 'metrics.csv'}")
        elif isinstance(lg, WandbLogger):
            run = lg.experiment
            run_dir = getattr(run, "dir", None)
            mode = os.environ.get("WANDB_MODE", "online")
            if run_dir:
                run_root = Path(run_dir).parent
                hint = f"  (offline: upload with `wandb sync {run_root}`)" if mode in ("offline", "dryrun") else ""
                lines.append(f"wandb run       : {run_root}{hint}")
            url = getattr(run, "url", None)
            if url:
                lines.append(f"wandb url       : {url}")
    if exported:
        lines.append(f"exported        : {exported}")
    keys = [k for k in ("val/acc", "val/acc_best", "test/acc", "train/loss") if k in metrics]
    if keys:
        lines.append("metrics         : " + ", ".join(f"{k}={metrics[k]:.4f}" for k in keys))
    print("\n".join(["", "lightning-struct train finished", *lines]), flush=True)


# --------------------------------------------------------------------------- Hydra app
def _metric_for_sweeper(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ValueError(f"optimized_metric={name!r} was not logged; available metrics: {sorted(metrics)}")
    return metrics[name]


RECIPES: list[str] = register_recipes()
register_resolvers()

import hydra  # noqa: E402  (after the recipes are registered)

#: (overrides, metrics, run dir, optimized metric name) of each job of this process (multirun summary)
_JOBS: list[tuple[list[str], dict[str, float], str, str | None]] = []


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_app(cfg: DictConfig) -> float | None:
    """Hydra entry: run one training job; return ``optimized_metric`` for sweepers."""
    metrics = train(cfg)
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        _JOBS.append((list(hc.overrides.task), metrics, str(hc.runtime.output_dir), cfg.get("optimized_metric")))
    except ValueError:  # no Hydra runtime (composed by hand)
        pass
    return _metric_for_sweeper(cfg, metrics)


def multirun_summary(jobs: Sequence[tuple[list[str], dict[str, float], str, str | None]]) -> str:
    """One line per job: the overrides that differ between jobs, the optimized metric, accuracies, run dir."""
    if not jobs:
        return ""
    common = set(jobs[0][0]).intersection(*(set(j[0]) for j in jobs[1:]))
    opt = next((j[3] for j in jobs if j[3]), None)
    wanted = (opt, "val/acc", "val/acc_best", "test/acc", "force/total_rank_fraction@0.95")  # accuracy vs rank
    keys = [k for k in wanted if k and any(k in j[1] for j in jobs)]
    keys = list(dict.fromkeys(keys))
    rows = [["job", "overrides", *keys, "run dir"]]
    for i, (overrides, metrics, run_dir, _) in enumerate(jobs):
        varying = " ".join(o for o in overrides if o not in common) or "(same as all)"
        rows.append([str(i), varying, *(f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys), run_dir])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    title = f"lightning-struct train: {len(jobs)} jobs" + (f" (optimized_metric={opt})" if opt else "")
    return "\n".join([title, *lines])


def _unknown_recipe(args: Sequence[str]) -> str | None:
    """A message for ``recipe=NAME`` naming no recipe (with close matches and every nested name)."""
    import difflib

    for a in args:
        key, sep, value = a.lstrip("+~").partition("=")
        if key != "recipe" or not sep or not value or value == "null" or "," in value or value in RECIPES:
            continue
        close = difflib.get_close_matches(value, RECIPES, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"lightning-struct train: unknown recipe {value!r} (Hydra group option recipe/{value}).{hint}\n"
            f"Available recipes: {', '.join(RECIPES)}"
        )
    return None


def _unknown_key(args: Sequence[str]) -> str | None:
    """A message for ``a.b=value`` naming no config key, with the close matches among its siblings.

    Hydra's own message ("Key 'max_epoch' is not in struct") names neither the alternatives nor
    the spelling that was meant; after Hydra has failed, the overrides are composed once more here
    (no job runs) to find out.
    """
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    overrides = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra.")]
    if not overrides:
        return None
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="check"):
            compose(config_name="config", overrides=overrides)
        return None
    except ConfigCompositionException as err:
        cause = err.__cause__
        if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or "not in struct" not in str(cause):
            return None
        full_key = getattr(cause, "full_key", None) or ""
    except Exception:  # noqa: BLE001 - anything else (sweeps, interpolations) is Hydra's to report
        return None
    bad = next((a for a in overrides if a.partition("=")[0] == full_key), None)
    if not full_key or bad is None:
        return None
    parent, _, leaf = full_key.rpartition(".")
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="check"):
            cfg = compose(config_name="config", overrides=[a for a in overrides if a != bad])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        siblings = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001
        siblings = []
    close = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr('.'.join(filter(None, [parent, c]))) for c in close)}?" if close else ""
    listed = f"\nKeys of {parent or 'the config'}: {', '.join(sorted(siblings))}" if siblings else ""
    return (
        f"lightning-struct train: {full_key!r} is not a config key ({bad}).{hint}"
        f" To add a new key, write +{bad}.{listed}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry (``lightning-struct train ...``): Hydra parses ``argv`` itself."""
    args = list(sys.argv[1:] if argv is None else argv)
    bad = _unknown_recipe(args)
    if bad is not None:
        print(bad, file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["lightning-struct-train", *args]
    _JOBS.clear()
    from hydra.errors import ConfigCompositionException

    try:
        hydra_app()
    except (SystemExit, ConfigCompositionException) as failure:
        # Hydra failed (it exits 1, or re-raises with HYDRA_FULL_ERROR=1): when a key is misspelt,
        # name the keys meant. The diagnosis composes the config once more, so it runs only here
        # and not on every start.
        hint = None if isinstance(failure, SystemExit) and failure.code != 1 else _unknown_key(args)
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    if len(_JOBS) > 1 or (_JOBS and any(a in ("-m", "--multirun") for a in args)):
        print("\n" + multirun_summary(_JOBS), flush=True)
    return 0
