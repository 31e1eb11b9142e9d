"""The classification task: mnist, cifar10, imagenet and imagefolder, registered by name."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from vitq.engine.tasks import EvalModule, Task, distillation_kl, register_task
from .builders import build_datamodule
from .data import TASKS
from .modules import ClassificationEval, ClassificationModule, create_model


@register_task(*TASKS)
class ClassificationTask(Task):
    """Image classification on any of TASKS; metrics top-1 and top-5 accuracy (%)."""

    metrics = ("top1", "top5")
    primary = "top1"

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg, model_cfg)
        data_config = None
        if str(cfg.get("name")).lower() in ("imagenet", "imagefolder"):
            import timm

            # the architecture with random weights gives the timm data config; the input size is the built
            # model's, not the pretrained config's
            probe = create_model(model_cfg, 1000, 3, pretrained=False)
            data_config = timm.data.resolve_data_config({}, model=probe)
            size = getattr(getattr(probe, "patch_embed", None), "img_size", None)
            if size is not None:
                data_config["input_size"] = (data_config["input_size"][0], *tuple(size))
        self.dm = build_datamodule(cfg, data_config)

    def create_model(self, pretrained: bool) -> torch.nn.Module:
        return create_model(self.model_cfg, self.dm.num_classes, self.dm.in_chans, pretrained)

    def identity(self) -> dict[str, Any]:
        return {"classes": self.dm.num_classes, "chans": self.dm.in_chans}

    def describe(self) -> dict[str, Any]:
        return self.dm.describe()

    def calib_loader(self, num_samples: int, batch_size: int, seed: int) -> DataLoader:
        return self.dm.calib_dataloader(num_samples, batch_size, seed=seed)

    def calibration_module(self, model: torch.nn.Module) -> lightning.LightningModule:
        return ClassificationModule(model)

    def eval_module(self, model: torch.nn.Module, prefix: str) -> EvalModule:
        return ClassificationEval(model, prefix, self.metrics)

    def test_loader(self) -> DataLoader:
        return self.dm.test_dataloader()

    def train_data(self) -> lightning.LightningDataModule:
        return self.dm

    def finetune_split(self, val_samples: int, seed: int) -> tuple[Dataset, Dataset]:
        return self.dm.finetune_split(val_samples, seed)

    def finetune_losses(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Any, temperature: float
                        ) -> dict[str, torch.Tensor]:
        """Cross-entropy on the labels, the logit distillation from the float model, and the batch's top-1
        accuracy (%)."""
        x, y = batch
        logits = student(x)
        with torch.no_grad():
            target = teacher(x)
        return {"task": torch.nn.functional.cross_entropy(logits, y), "kd": distillation_kl(logits, target, temperature),
                "top1": (logits.argmax(-1) == y).float().mean() * 100}

    def fit_module(self, model: torch.nn.Module, fit: Mapping[str, Any]) -> lightning.LightningModule:
        return ClassificationModule(model, lr=float(fit["lr"]), weight_decay=float(fit["weight_decay"]),
                                    epochs=int(fit["epochs"]), warmup_epochs=int(fit.get("warmup_epochs", 0)),
                                    label_smoothing=float(fit.get("label_smoothing", 0.0)),
                                    mixup=float(fit.get("mixup") or 0.0), cutmix=float(fit.get("cutmix") or 0.0),
                                    num_threads=fit.get("num_threads"), num_classes=self.dm.num_classes)
