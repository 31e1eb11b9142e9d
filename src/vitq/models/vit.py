"""Adapter for timm VisionTransformer (ViT, DeiT, DeiT with distillation token)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.layers import Attention, LayerNorm as TimmLayerNorm
from timm.models.vision_transformer import Block, VisionTransformer

from ..quant.modules import QuantLayerNorm, QuantMatMul, QuantSoftmax, Twin
from .registry import (Adapter, AttentionOptions, place_qkv_points, quantize_after_activation,
                       register_adapter)


def additive_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """scaled_dot_product_attention's mask semantics as an additive bias."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=like.dtype).masked_fill(~mask, float("-inf"))


class QuantAttention(Twin, Attention):
    """timm Attention computed explicitly so that q.k^T, the softmax and attn.v are quant points.

    The qkv output is quantized as the operands q, k (matmul_qk) and v (matmul_av.b), so the qkv layer
    has no output point of its own.
    """

    def _add_points(self) -> None:
        self.matmul_qk = QuantMatMul(transpose_b=True)
        self.softmax = QuantSoftmax(dim=-1)
        self.matmul_av = QuantMatMul(a_kind=None)  # the probabilities are quantized by softmax.output

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        place_qkv_points(self, options)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if is_causal:
            raise NotImplementedError("causal attention is not used by vision transformers")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul_qk(q * self.scale, k)
        attn = self.softmax(attn, mask=additive_mask(attn_mask, attn))
        x = self.matmul_av(self.attn_drop(attn), v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantBlock(Twin, Block):
    """Pre-norm block whose residual stream is quantized where it enters each LayerNorm (FQ-ViT's
    residual sums); with norm_input points off it computes exactly the float block."""

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        quantize_after_activation(getattr(self.mlp, "fc1", None))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        x = self.norm1.input_quantizer(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1.normalize(x), attn_mask=attn_mask,
                                                   is_causal=is_causal)))
        x = self.norm2.input_quantizer(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2.normalize(x))))


class ViTAdapter(Adapter):
    family = "vit"
    Options = AttentionOptions
    roots = (VisionTransformer,)
    twins = {Attention: QuantAttention, Block: QuantBlock, TimmLayerNorm: QuantLayerNorm}

    def units(self, root: VisionTransformer) -> list[str]:
        return ["patch_embed", *(f"blocks.{i}" for i in range(len(root.blocks))), "head"]

    def norm_pairs(self, root: VisionTransformer) -> list[tuple[str, str]]:
        pairs = []
        for i, block in enumerate(root.blocks):
            if isinstance(block, Block):
                pairs += [(f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv"), (f"blocks.{i}.norm2", f"blocks.{i}.mlp.fc1")]
        return pairs


register_adapter(ViTAdapter())
