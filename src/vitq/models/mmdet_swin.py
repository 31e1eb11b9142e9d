"""Adapters for mmdet: its Swin backbone, and the two-stage detectors built around it.

mmdet's Swin (`mmdet.models.backbones.swin`) names its parts differently from timm's: `stages.i` for
`layers.i`, `attn.w_msa` (inside `ShiftWindowMSA`) for `attn`, `ffn.layers.0.0` / `ffn.layers.1` for
`mlp.fc1` / `mlp.fc2`, `patch_embed.projection` for `patch_embed.proj`, and its patch merging comes at
the end of a stage. The twins here give it the same points, of the same kinds, as the timm Swin twins:
`attn.w_msa.matmul_qk.a/.b`, `softmax.input/.output`, `matmul_av.b`, the residual stream at
`norm1.input` / `norm2.input`, and every Linear / Conv2d input, weight and output. State-dict keys do not
change, so mmdet checkpoints load into the rewritten model.

mmdet is imported only once a model built by it exists (`sys.modules`), so classification runs never
pay for it and a machine without mmdet can still import vitq.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantSoftmax, Twin
from .registry import (Adapter, AttentionOptions, place_qkv_points, quantize_after_activation,
                       register_adapter)

DETECTOR_SCOPES = ("backbone", "backbone+neck", "all")


def _loaded() -> bool:
    return "mmdet.models" in sys.modules


class _QuantWindowMSAMixin(Twin):
    """mmdet WindowMSA computed explicitly. As in the timm twin, the scores are quantized after the
    relative position bias and before the shifted-window mask."""

    def _add_points(self) -> None:
        self.matmul_qk = QuantMatMul(transpose_b=True)
        self.softmax = QuantSoftmax(dim=-1)  # replaces the float nn.Softmax (no parameters)
        self.matmul_av = QuantMatMul(a_kind=None)  # the probabilities are quantized at softmax.output

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        place_qkv_points(self, options)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.matmul_qk(q * self.scale, k)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is None:
            attn = self.softmax(attn)
        else:
            nw = mask.shape[0]
            attn = attn.view(B // nw, nw, self.num_heads, N, N)
            attn = self.softmax(attn, mask=mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, N, N)
        x = self.matmul_av(self.attn_drop(attn), v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class _QuantSwinBlockMixin(Twin):
    """mmdet SwinBlock whose residual stream is quantized where it enters each LayerNorm."""

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        quantize_after_activation(self.ffn.layers[0][0])  # FFN: Sequential(Linear, GELU, Dropout), Linear

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        x = self.norm1.input_quantizer(x)
        x = x + self.attn(self.norm1.normalize(x), hw_shape)
        x = self.norm2.input_quantizer(x)
        return self.ffn(self.norm2.normalize(x), identity=x)


_TWINS: dict[type, type] = {}


def _twins() -> dict[type, type]:
    """Twin classes, made once mmdet is loaded (each subclasses the mmdet class it replaces)."""
    if not _TWINS and _loaded():
        from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d, Linear as MMCVLinear
        from mmdet.models.backbones.swin import SwinBlock, WindowMSA

        _TWINS[WindowMSA] = type("QuantWindowMSA", (_QuantWindowMSAMixin, WindowMSA), {})
        _TWINS[SwinBlock] = type("QuantMMDetSwinBlock", (_QuantSwinBlockMixin, SwinBlock), {})
        # mmcv's Linear / Conv2d wrappers (FFN's layers, some head convs): the plain twins' forward
        # (torch handles the empty batches those wrappers were written for)
        _TWINS[MMCVLinear] = type("QuantMMCVLinear", (QuantLinear, MMCVLinear), {})
        _TWINS[MMCVConv2d] = type("QuantMMCVConv2d", (QuantConv2d, MMCVConv2d), {})
    return _TWINS


class _MMDetAdapter(Adapter):
    """An adapter whose root is an mmdet class (`root_class`: module, name), looked up only once mmdet is
    loaded, with the mmdet twins."""

    root_class: tuple[str, str]

    @property
    def roots(self) -> tuple[type[nn.Module], ...]:  # type: ignore[override]
        if not _loaded():
            return ()
        module, name = self.root_class
        return (getattr(importlib.import_module(module), name),)

    @property
    def twins(self) -> dict[type, type]:  # type: ignore[override]
        return _twins()


class MMDetSwinAdapter(_MMDetAdapter):
    """mmdet's SwinTransformer backbone (WindowMSA / ShiftWindowMSA, PatchMerging, FFN, out norms).

    ShiftWindowMSA, PatchMerging and FFN keep their forward: their Linear, Conv2d and LayerNorm children
    become twins (PatchMerging's LayerNorm feeds its reduction Linear, as in timm)."""

    family = "mmdet_swin"
    Options = AttentionOptions
    root_class = ("mmdet.models.backbones.swin", "SwinTransformer")

    def units(self, root: nn.Module) -> list[str]:
        names = ["patch_embed"]
        for i, stage in enumerate(root.stages):
            names += [f"stages.{i}.blocks.{j}" for j in range(len(stage.blocks))]
            if stage.downsample is not None:
                names.append(f"stages.{i}.downsample")
        return names

    def norm_pairs(self, root: nn.Module) -> list[tuple[str, str]]:
        pairs = []
        for i, stage in enumerate(root.stages):
            for j in range(len(stage.blocks)):
                b = f"stages.{i}.blocks.{j}"
                pairs += [(f"{b}.norm1", f"{b}.attn.w_msa.qkv"), (f"{b}.norm2", f"{b}.ffn.layers.0.0")]
            if stage.downsample is not None and getattr(stage.downsample, "norm", None) is not None:
                pairs.append((f"stages.{i}.downsample.norm", f"stages.{i}.downsample.reduction"))
        return pairs


SWIN = register_adapter(MMDetSwinAdapter())


@dataclasses.dataclass
class DetectorOptions:
    detector_scope: str = "backbone"  # backbone (as the papers) | backbone+neck | all (also the heads)

    def __post_init__(self) -> None:
        if self.detector_scope not in DETECTOR_SCOPES:
            raise ValueError(f"quant.detector_scope={self.detector_scope!r} is unknown: choose one of "
                             f"{', '.join(DETECTOR_SCOPES)}")


class MMDetDetectorAdapter(_MMDetAdapter):
    """An mmdet detector whose backbone has an adapter: the backbone through that adapter, and, as
    `quant.detector_scope` says, the neck and the heads through the plain Linear / Conv2d twins
    (convolution maps keep their channel axis 1)."""

    family = "mmdet"
    Options = DetectorOptions
    root_class = ("mmdet.models.detectors", "BaseDetector")

    def _backbone(self, root: nn.Module) -> Adapter:
        backbone = getattr(root, "backbone", None)
        for adapter in (SWIN,):
            if backbone is not None and isinstance(backbone, adapter.roots):
                return adapter
        raise TypeError(f"vitq adapts mmdet detectors with a Swin backbone; this {type(root).__name__} has a "
                        f"{type(backbone).__name__} backbone")

    def _parts(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        scope = DetectorOptions(**{k: options[k] for k in ("detector_scope",) if k in options}).detector_scope
        return {"backbone": ("backbone",), "backbone+neck": ("backbone", "neck"),
                "all": ("backbone", "neck", "rpn_head", "roi_head", "bbox_head", "mask_head")}[scope]

    def modules(self, root: nn.Module, options: Mapping[str, Any]) -> Iterable[nn.Module]:
        self._backbone(root)
        for part in self._parts(options):
            child = getattr(root, part, None)
            if isinstance(child, nn.Module):
                yield from child.modules()

    def describe(self, options: Mapping[str, Any]) -> str:
        return f"det:{options.get('detector_scope', DetectorOptions.detector_scope)}"

    def units(self, root: nn.Module) -> list[str]:
        names = [f"backbone.{n}" for n in self._backbone(root).units(root.backbone)]
        return names + [p for p in ("neck", "rpn_head", "roi_head", "bbox_head") if hasattr(root, p)]

    def norm_pairs(self, root: nn.Module) -> list[tuple[str, str]]:
        return [(f"backbone.{a}", f"backbone.{b}") for a, b in self._backbone(root).norm_pairs(root.backbone)]


register_adapter(MMDetDetectorAdapter())
