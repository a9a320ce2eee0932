"""A generic image classifier LightningModule around any ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_struct._checks import check_number

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification of ``net(x)`` logits with top-1/top-5 accuracy.

    Args:
        net: any module mapping images ``(B, C, H, W)`` to logits ``(B, num_classes)``
            (Hydra: ``_target_: torchvision.models.resnet50`` with ``num_classes``).
        num_classes: number of classes; checked against the datamodule and the net's output.
        optimizer: factory ``params -> Optimizer`` (a Hydra ``_partial_``); default Adam(lr=1e-3).
        scheduler: factory ``optimizer -> LRScheduler`` (a Hydra ``_partial_``) or ``None``;
            ``ReduceLROnPlateau`` monitors ``val/loss``. Stepped every epoch.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        compile: wrap ``net`` with ``torch.compile`` at fit start.

    Logged: ``{train,val,test}/loss``, ``{train,val,test}/acc`` (top-1),
    ``{val,test}/acc_top5``, and ``val/acc_best`` (best top-1 so far).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"model.net must be an nn.Module, got {type(net).__name__}")
        if int(num_classes) < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")
        check_number(
            label_smoothing, "model.label_smoothing", "ImageClassifier", minimum=0, maximum=1, open_max=True
        )
        # plain values only, so checkpoints load with torch.load(weights_only=True); the factories
        # and the net's own config travel in ``run_config`` (see :func:`load_classifier`)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.num_classes = int(num_classes)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.compile = compile
        top5 = min(5, self.num_classes)
        self.train_acc = MulticlassAccuracy(self.num_classes, top_k=1)
        self.val_acc = MulticlassAccuracy(self.num_classes, top_k=1)
        self.val_acc5 = MulticlassAccuracy(self.num_classes, top_k=top5)
        self.test_acc = MulticlassAccuracy(self.num_classes, top_k=1)
        self.test_acc5 = MulticlassAccuracy(self.num_classes, top_k=top5)
        self.val_loss = MeanMetric()
        self.val_acc_best = MaxMetric()
        self._output_checked = False
        #: the resolved run config (plain dict) set by ``lightning-struct train``; saved in checkpoints
        #: so :func:`load_classifier` can rebuild ``net`` without the original Python code path
        self.run_config: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_classes = getattr(dm, "num_classes", None)
        if dm_classes is not None and int(dm_classes) != self.num_classes:
            raise ValueError(
                f"model.num_classes={self.num_classes} but the datamodule ({type(dm).__name__}) has "
                f"{dm_classes} classes; set model.num_classes={dm_classes}"
            )
        shape = getattr(dm, "input_shape", None)
        if self.example_input_array is None and shape is not None:
            # one zero image: Lightning's model summary then shows real FLOPs and in/out sizes
            self.example_input_array = torch.zeros(1, *shape)
        if self.compile and stage == "fit":
            self.net = torch.compile(self.net)  # type: ignore[assignment]

    def _check_output(self, logits: torch.Tensor) -> None:
        if self._output_checked:
            return
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"model.net returns logits of shape {tuple(logits.shape)} but model.num_classes={self.num_classes}; "
                "the net's classifier must output (batch, num_classes)"
            )
        self._output_checked = True

    # ------------------------------------------------------------------ steps
    def _shared(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        self._check_output(logits)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, logits, y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits, y = self._shared(batch)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_start(self) -> None:
        # sanity-check validation must not count towards the best accuracy; a resumed run goes on
        # from the best it had reached
        self.val_acc_best.reset()
        resumed = getattr(self, "_resumed_best", None)
        if resumed is not None and torch.isfinite(resumed):
            self.val_acc_best.update(resumed.to(self.device))
        self._resumed_best = None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._shared(batch)
        self.val_loss(loss)
        self.val_acc(logits, y)
        self.val_acc5(logits, y)
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val/acc_top5", self.val_acc5, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=False, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._shared(batch)
        self.test_acc(logits, y)
        self.test_acc5(logits, y)
        self.log("test/loss", loss, on_epoch=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
        self.log("test/acc_top5", self.test_acc5, on_epoch=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        # torchmetrics states are not in the state_dict: keep the running best across a resume
        checkpoint["val_acc_best"] = self.val_acc_best.max_value.detach().cpu().clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("run_config") is not None and self.run_config is None:
            self.run_config = checkpoint["run_config"]
        if "val_acc_best" in checkpoint:
            self._resumed_best = checkpoint["val_acc_best"]
        # a converted checkpoint (StructuredConversion, convert + save): rebuild the factor layers
        # first, so ImageClassifier.load_from_checkpoint(path, net=dense_net) loads it as it is
        from lightning_struct.surgery.checkpoint import restore_structure

        restore_structure(self, checkpoint)

    # ------------------------------------------------------------------ optim
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=1e-3)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch", "frequency": 1}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


def load_classifier(checkpoint: str | dict[str, Any], map_location: str | torch.device = "cpu") -> ImageClassifier:
    """Rebuild an :class:`ImageClassifier` (net included) from a ``lightning-struct train`` checkpoint.

    The net is re-created from the ``run_config`` stored in the checkpoint (``model.net``
    config) and the weights are loaded strictly. Raises ``ValueError`` for checkpoints that carry no
    run config (written outside ``lightning-struct train``): build the net yourself and use
    ``ImageClassifier.load_from_checkpoint(path, net=net)`` instead.
    """
    from hydra.utils import instantiate

    ckpt = torch.load(checkpoint, map_location=map_location, weights_only=True) if not isinstance(checkpoint, dict) else checkpoint
    run_config = ckpt.get("run_config")
    if not run_config or "model" not in run_config:
        raise ValueError(
            "checkpoint has no 'run_config' (it was not written by `lightning-struct train`); "
            "use ImageClassifier.load_from_checkpoint(path, net=<your net>)"
        )
    model_cfg = run_config["model"]
    net = instantiate(model_cfg["net"])
    hp = ckpt.get("hyper_parameters", {})
    model = ImageClassifier(
        net,
        num_classes=hp.get("num_classes", model_cfg.get("num_classes")),
        label_smoothing=hp.get("label_smoothing", 0.0),
    )
    model.on_load_checkpoint(ckpt)  # converted structure first, as load_from_checkpoint does
    model.load_state_dict(ckpt["state_dict"])
    return model
