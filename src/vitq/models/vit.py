"""Adapter for timm VisionTransformer (ViT, DeiT, DeiT with distillation token)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from timm.layers import Attention, LayerNorm as TimmLayerNorm
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from ..quant.modules import QuantLayerNorm, QuantMatMul, QuantSoftmax, Twin
from ..quant.points import Kind, QuantPoint
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


@dataclasses.dataclass
class ViTOptions(AttentionOptions):
    """`embedding_points`: quantize the token embeddings (class token included) and the position embedding
    before their sum, as FQ-ViT's `qact_embed` and `qact_pos` (`vit_quant.py:389-391`); the sum is then
    quantized at blocks.0.norm1.input (its `qact1`). Needs the position embedding added after the class
    token is prepended (timm's default, not `no_embed_class` or `dynamic_img_size`)."""

    embedding_points: bool = False


class EmbeddingPoints(Twin):
    """A ViT root with optional points on the two summands of the position embedding (`ViTOptions`); the
    prefix tokens (class, distillation, register) are quantized with the patch tokens, as `qact_embed`."""

    def _add_points(self) -> None:
        self.tokens_quantizer: QuantPoint | None = QuantPoint(Kind.LINEAR_OUTPUT)
        self.pos_embed_quantizer: QuantPoint | None = QuantPoint(Kind.LINEAR_OUTPUT)

    def after_rewrite(self, options: Mapping[str, Any]) -> None:
        if not options.get("embedding_points", False):
            self.tokens_quantizer = self.pos_embed_quantizer = None
        elif self.pos_embed is None or self.no_embed_class or self.dynamic_img_size:
            raise ValueError("quant.embedding_points=true quantizes the position embedding and the tokens it is "
                             "added to, but this ViT adds it another way (no_embed_class, dynamic_img_size or no "
                             "position embedding): set quant.embedding_points=false")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens_quantizer is None:
            return super()._pos_embed(x)
        tokens = (self.cls_token, getattr(self, "dist_token", None), getattr(self, "reg_token", None))
        prefix = [t.expand(x.shape[0], -1, -1) for t in tokens if t is not None]
        x = self.tokens_quantizer(torch.cat([*prefix, x], dim=1))
        return self.pos_drop(x + self.pos_embed_quantizer(self.pos_embed))


class QuantVisionTransformer(EmbeddingPoints, VisionTransformer):
    pass


class QuantVisionTransformerDistilled(EmbeddingPoints, VisionTransformerDistilled):
    pass


class ViTAdapter(Adapter):
    family = "vit"
    Options = ViTOptions
    roots = (VisionTransformer,)
    twins = {VisionTransformer: QuantVisionTransformer, VisionTransformerDistilled: QuantVisionTransformerDistilled,
             Attention: QuantAttention, Block: QuantBlock, TimmLayerNorm: QuantLayerNorm}

    def describe(self, options: Mapping[str, Any]) -> str:
        return "+embed" if options.get("embedding_points", False) else ""

    def units(self, root: VisionTransformer) -> list[str]:
        return ["patch_embed", *(f"blocks.{i}" for i in range(len(root.blocks))), "head"]

    def norm_pairs(self, root: VisionTransformer) -> list[tuple[str, str]]:
        pairs = []
        for i, block in enumerate(root.blocks):
            if isinstance(block, Block):
                pairs += [(f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv"), (f"blocks.{i}.norm2", f"blocks.{i}.mlp.fc1")]
        return pairs

    def output_norms(self, root: VisionTransformer) -> list[tuple[str, str]]:
        # a distilled model's second head reads token 1 of the same output on a grid of its own
        token = root.global_pool == "token" and isinstance(root.fc_norm, torch.nn.Identity) \
            and getattr(root, "head_dist", None) is None
        return [("norm", "head")] if token and isinstance(root.norm, QuantLayerNorm) \
            and isinstance(getattr(root.head, "input_quantizer", None), QuantPoint) else []


register_adapter(ViTAdapter())
