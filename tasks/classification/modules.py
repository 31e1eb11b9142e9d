"""The float architecture (timm), and the Lightning modules that train it and evaluate a model."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning
import torch

from vitq.engine.tasks import EvalModule


def create_model(model_cfg: Mapping[str, Any], num_classes: int, in_chans: int, pretrained: bool) -> torch.nn.Module:
    """A timm classifier, with hub weights if asked, and a clear error when that fails."""
    import logging

    import timm

    arch = model_cfg["arch"]
    if not timm.is_model(arch):
        raise ValueError(f"model.arch={arch!r} is not a timm model; e.g. deit_small_patch16_224, "
                         f"vit_base_patch16_224, swin_tiny_patch4_window7_224 (timm.list_models('*vit*'))")
    kwargs = dict(model_cfg.get("kwargs") or {})
    if pretrained:
        default_classes = timm.models.get_pretrained_cfg_value(arch, "num_classes")  # no model built for this
        if default_classes is not None and default_classes != num_classes:
            logging.getLogger(__name__).warning(
                "%s was pretrained with %d classes but the task has %d: the head starts untrained, so float "
                "accuracy means nothing until it is finetuned", arch, default_classes, num_classes)
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as e:  # hub download / cache miss
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for {arch} ({type(e).__name__}: {e}). Without network access "
            f"the weights must already be in the Hugging Face hub cache ($HF_HOME); otherwise pass "
            f"model.checkpoint=/path/to/weights.pth or model.pretrained=false"
        ) from None


class ClassificationModule(lightning.LightningModule):
    """Float training of any image classifier, and the calibration forward (`validation_step` runs the
    model only: observers see the batches, nothing is logged).

    Training: AdamW without weight decay on biases, norms, position embedding and class token (timm's
    grouping), linear warmup then cosine per step; `mixup` / `cutmix` > 0 mix each even-sized batch with
    timm's Mixup (soft targets, label smoothing folded in); `num_threads` sets torch's intra-op threads
    for the fit only (one thread avoids OpenMP spinning when other work shares a small machine).
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.05, epochs: int = 1,
                 warmup_epochs: int = 0, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0,
                 num_threads: int | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.epochs, self.warmup_epochs = lr, weight_decay, epochs, warmup_epochs
        self.label_smoothing = label_smoothing
        self.mix = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            classes = num_classes or getattr(model, "num_classes", None)
            self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                             num_classes=classes)
            self.soft_ce = SoftTargetCrossEntropy()
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"task.fit.num_threads must be >= 1 or null, got {num_threads}")
        self.num_threads, self._threads_before = num_threads, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        if self.mix is not None and len(x) % 2 == 0:  # timm's Mixup pairs the batch with its reverse
            x, soft = self.mix(x, y)
            loss = self.soft_ce(self.model(x), soft)
        else:
            loss = torch.nn.functional.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
        self.log("float/train_loss", loss, prog_bar=True)  # not train/loss: finetuning logs that
        return loss

    def on_fit_start(self) -> None:
        if self.num_threads is not None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.num_threads)

    def on_fit_end(self) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        self.model(batch[0])

    def configure_optimizers(self):  # noqa: ANN201
        from timm.optim import param_groups_weight_decay

        no_decay = getattr(self.model, "no_weight_decay", lambda: set())()
        groups = param_groups_weight_decay(self.model, self.weight_decay, no_weight_decay_list=no_decay)
        opt = torch.optim.AdamW(groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(total * self.warmup_epochs / max(1, self.epochs))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}


class ClassificationEval(EvalModule):
    """Top-1 and top-5 correctness of every evaluation image."""

    def outcomes(self, batch) -> dict[str, torch.Tensor]:  # noqa: ANN001
        x, y = batch
        logits = self.model(x)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == y[:, None]
        return {"top1": hit[:, 0], "top5": hit.any(dim=-1)}
