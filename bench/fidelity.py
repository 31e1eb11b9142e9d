"""Fidelity on DeiT-S (random weights, seed 0) against the float model, on the protocol used to run the
published RepQ-ViT and FQ-ViT code side by side: 32 calibration and 256 evaluation CIFAR-10 images at
224 (timm's evaluation transform for deit_small; class-interleaved first N of cifar10-small train/val).

Metrics of a quantized model against float: top-1 agreement (% of images whose argmax is the float
model's), mean per-image logit cosine, SQNR over all logits, calibration wall time.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

ARCH = "deit_small_patch16_224"
CALIB, EVAL, BATCH = 32, 256, 64


def protocol_data(cifar: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import timm
    from torchvision.datasets import ImageFolder

    from vitq.tasks.classification import interleaved_first

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    def take(split: str, n: int) -> torch.Tensor:
        ds = ImageFolder(str(cifar / split))
        return torch.stack([transform(ds[i][0]) for i in interleaved_first(ds.targets, n)])

    return take("train", CALIB), take("val", EVAL)


def float_model() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False).eval()


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]).double()


def compare(q: torch.Tensor, fp: torch.Tensor) -> dict[str, float]:
    return {"agreement": 100.0 * float((q.argmax(1) == fp.argmax(1)).double().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(q, fp, dim=1).mean()),
            "sqnr_db": float(10 * torch.log10(fp.pow(2).sum() / (q - fp).pow(2).sum()))}


def run_case(recipe, calib: torch.Tensor, evaluate: torch.Tensor, fp: torch.Tensor) -> dict:
    import vitq

    model = vitq.quantize(float_model(), recipe)
    start = time.perf_counter()
    vitq.calibrate(model, lambda m: m(calib))
    seconds = time.perf_counter() - start
    return {**compare(logits(model, evaluate), fp), "calib_seconds": seconds, "setting": model.vitq_recipe.describe()}
