"""The Lightning module for classification: float training, calibration passes and evaluation."""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ClassificationModule(L.LightningModule):
    """Wraps any image classifier.

    `prefix` names the metrics (`fp/top1`, `quant/top1`); validation runs the model forward only, which
    is what calibration needs (observers see the batches, nothing is logged).
    """

    def __init__(self, model: nn.Module, num_classes: int, prefix: str = "fp", lr: float = 1e-3,
                 weight_decay: float = 0.05, epochs: int = 1, warmup_epochs: int = 0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.prefix = prefix
        self.lr, self.weight_decay, self.epochs, self.warmup_epochs = lr, weight_decay, epochs, warmup_epochs
        self.label_smoothing = label_smoothing
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        self.model(batch[0])

    def test_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        logits = self.model(x)
        self.top1(logits, y)
        self.top5(logits, y)
        self.log(f"{self.prefix}/top1", self.top1, on_epoch=True)
        self.log(f"{self.prefix}/top5", self.top5, on_epoch=True)

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(total * self.warmup_epochs / max(1, self.epochs))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}
