"""Adapter for timm SwinTransformer: window attention with relative position bias and shift masks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention

from ..quant.modules import QuantLayerNorm, QuantMatMul, QuantSoftmax, Twin
from ..quant.points import Kind, QuantPoint
from .registry import (Adapter, AttentionOptions, place_qkv_points, quantize_after_activation,
                       register_adapter)


class QuantWindowAttention(Twin, WindowAttention):
    """Window attention computed explicitly. The scores are quantized after the relative position
    bias is added and before the shifted-window mask (so the mask does not stretch their grid)."""

    def _add_points(self) -> None:
        self.matmul_qk = QuantMatMul(transpose_b=True)
        self.softmax = QuantSoftmax(dim=-1)  # replaces the float nn.Softmax
        self.matmul_av = QuantMatMul(a_kind=None)
        # FQ-ViT's qact_attn1 (the scores before the bias) and qact_table (the bias table), `bias_points`
        self.scores_quantizer: QuantPoint | None = QuantPoint(Kind.SOFTMAX_INPUT)
        self.bias_table_quantizer: QuantPoint | None = QuantPoint(Kind.LINEAR_OUTPUT)

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        place_qkv_points(self, options)
        if not options.get("bias_points", False):
            self.scores_quantizer = self.bias_table_quantizer = None

    def _get_rel_pos_bias(self) -> torch.Tensor:
        table = self.relative_position_bias_table
        if self.bias_table_quantizer is not None:
            table = self.bias_table_quantizer(table)
        bias = table[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul_qk(q * self.scale, k)
        if self.scores_quantizer is not None:
            attn = self.scores_quantizer(attn)
        attn = attn + self._get_rel_pos_bias()
        if mask is None:
            attn = self.softmax(attn)
        else:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N)
            attn = self.softmax(attn, mask=mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, N, N)
        x = self.matmul_av(self.attn_drop(attn), v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class QuantSwinBlock(Twin, SwinTransformerBlock):
    """Swin block whose residual stream is quantized where it enters each LayerNorm."""

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        quantize_after_activation(getattr(self.mlp, "fc1", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self.norm1.input_quantizer(x)
        x = x + self.drop_path1(self._attn(self.norm1.normalize(x)))
        x = self.norm2.input_quantizer(x.reshape(B, -1, C))
        x = x + self.drop_path2(self.mlp(self.norm2.normalize(x)))
        return x.reshape(B, H, W, C)


class QuantPatchMerging(Twin, PatchMerging):
    """PatchMerging whose LayerNorm (over four concatenated channel groups) feeds the reduction layer."""


@dataclass
class SwinOptions(AttentionOptions):
    """`stage_points`: quantize a stage's input once, on a plain per-tensor grid, and the final LayerNorm's
    output before pooling, as FQ-ViT's `swin_quant.py`: the patch embedding's LayerNorm reads `qact_before_norm`
    and writes `patch_embed.qact`, which is the first block's input (its `norm1` reads it: no PTF point
    there); a PatchMerging's reduction output (`downsample.qact2`) is the next block's input in the same
    way; the final LayerNorm writes `qact2`, pooled, then `qact3` (the head's input). Each of those
    LayerNorms runs integer into the point after it."""

    stage_points: bool = False
    # the attention scores quantized before the relative position bias is added, and the bias table itself
    # (FQ-ViT's `qact_attn1`, `qact_table`, swin_quant.py:190-204); the sum is `softmax.input` (its qact2)
    bias_points: bool = False


class QuantSwinTransformer(Twin, SwinTransformer):
    """Swin root with an optional point on the final LayerNorm's output (before the average pooling)."""

    def _add_points(self) -> None:
        self.norm_output_quantizer: QuantPoint | None = QuantPoint(Kind.LINEAR_OUTPUT)

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        if not options.get("stage_points", False):
            self.norm_output_quantizer = None
            return
        entries = [getattr(self.patch_embed, "proj", None)]  # their outputs are quantized as a block's input
        entries += [stage.downsample.reduction for stage in self.layers if isinstance(stage.downsample, PatchMerging)]
        for layer in entries:
            if getattr(layer, "output_quantizer", None) is not None:
                layer.output_quantizer = None
        norms = [self.patch_embed.norm] + [stage.blocks[0].norm1 for stage in self.layers if len(stage.blocks)]
        for norm in norms:
            if isinstance(norm, QuantLayerNorm):
                norm.input_quantizer.kind = Kind.LINEAR_OUTPUT  # a plain activation grid, not PTF
                norm.uniform_input = True

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.patch_embed(x)))
        return x if self.norm_output_quantizer is None else self.norm_output_quantizer(x)


class SwinAdapter(Adapter):
    family = "swin"
    Options = SwinOptions
    roots = (SwinTransformer,)
    twins = {SwinTransformer: QuantSwinTransformer, WindowAttention: QuantWindowAttention,
             PatchMerging: QuantPatchMerging, SwinTransformerBlock: QuantSwinBlock}

    def describe(self, options: Mapping[str, Any]) -> str:
        return "".join(w for w, key in (("+stages", "stage_points"), ("+bias", "bias_points")) if options.get(key))

    def units(self, root: SwinTransformer) -> list[str]:
        names = ["patch_embed"]
        for i, stage in enumerate(root.layers):
            if isinstance(stage.downsample, PatchMerging):
                names.append(f"layers.{i}.downsample")
            names += [f"layers.{i}.blocks.{j}" for j in range(len(stage.blocks))]
        return [*names, "head"]

    def norm_pairs(self, root: SwinTransformer) -> list[tuple[str, str]]:
        pairs = []
        for i, stage in enumerate(root.layers):
            if isinstance(stage.downsample, PatchMerging):
                pairs.append((f"layers.{i}.downsample.norm", f"layers.{i}.downsample.reduction"))
            for j in range(len(stage.blocks)):
                b = f"layers.{i}.blocks.{j}"
                pairs += [(f"{b}.norm1", f"{b}.attn.qkv"), (f"{b}.norm2", f"{b}.mlp.fc1")]
        return pairs

    def output_norms(self, root: SwinTransformer) -> list[tuple[str, str]]:
        if getattr(root, "norm_output_quantizer", None) is None:
            return []
        pairs = [("norm", "norm_output_quantizer")] if isinstance(root.norm, QuantLayerNorm) else []
        if isinstance(root.patch_embed.norm, QuantLayerNorm) and len(root.layers[0].blocks):
            pairs.append(("patch_embed.norm", "layers.0.blocks.0.norm1"))
        return pairs


register_adapter(SwinAdapter())
