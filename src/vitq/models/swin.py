"""Adapter for timm SwinTransformer: window attention with relative position bias and shift masks."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention

from ..quant.modules import QuantMatMul, QuantSoftmax, Twin
from .registry import (Adapter, AttentionOptions, place_qkv_points, quantize_after_activation,
                       register_adapter)


class QuantWindowAttention(Twin, WindowAttention):
    """Window attention computed explicitly. The scores are quantized after the relative position
    bias is added and before the shifted-window mask (so the mask does not stretch their grid)."""

    def _add_points(self) -> None:
        self.matmul_qk = QuantMatMul(transpose_b=True)
        self.softmax = QuantSoftmax(dim=-1)  # replaces the float nn.Softmax
        self.matmul_av = QuantMatMul(a_kind=None)

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        place_qkv_points(self, options)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul_qk(q * self.scale, k)
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


class SwinAdapter(Adapter):
    family = "swin"
    Options = AttentionOptions
    roots = (SwinTransformer,)
    twins = {WindowAttention: QuantWindowAttention, PatchMerging: QuantPatchMerging,
             SwinTransformerBlock: QuantSwinBlock}

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


register_adapter(SwinAdapter())
