"""The small timm ViT the method tests calibrate (2 blocks, width 48, 32x32 inputs, 10 classes)."""
from __future__ import annotations

import copy

import timm
import torch

import vitq

VIT = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2,
           embed_dim=48, num_heads=2)


def model_and_inputs(n: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The float model (seed 0) and `n` random inputs drawn right after it."""
    torch.manual_seed(0)
    model = timm.create_model(**VIT).eval()
    return model, torch.randn(n, 3, 32, 32)


def calibrated(model: torch.nn.Module, recipe, x: torch.Tensor) -> torch.nn.Module:  # noqa: ANN001
    """A quantized copy of `model` calibrated on `x` in batches of 16."""
    q = vitq.quantize(copy.deepcopy(model), recipe)
    vitq.calibrate(q, lambda m: [m(x[i:i + 16]) for i in range(0, len(x), 16)])
    return q
