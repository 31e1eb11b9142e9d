"""Adapter for timm VisionTransformer (ViT, DeiT, DeiT with distillation token)."""
from __future__ import annotations

import torch
from timm.layers import Attention, LayerNorm as TimmLayerNorm
from timm.models.vision_transformer import VisionTransformer

from ..quant.modules import QuantLayerNorm, QuantMatMul, QuantSoftmax
from .registry import register_family, register_twin


def apply_mask(attn: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Additive or boolean attention mask, with scaled_dot_product_attention's semantics."""
    if mask is None:
        return attn
    if mask.dtype == torch.bool:
        return attn.masked_fill(~mask, float("-inf"))
    return attn + mask


class QuantAttention(Attention):
    """timm Attention computed explicitly so q.k^T, softmax and attn.v are quant points."""

    @classmethod
    def convert(cls, module: Attention) -> "QuantAttention":
        module.__class__ = cls
        module.matmul_qk = QuantMatMul()
        module.softmax = QuantSoftmax(dim=-1)
        module.matmul_av = QuantMatMul(a_kind=None)  # the probabilities are quantized by softmax.output
        return module

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if is_causal:
            raise NotImplementedError("causal attention is not used by vision transformers")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        attn = self.softmax(apply_mask(attn, attn_mask))
        x = self.matmul_av(self.attn_drop(attn), v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


register_twin(Attention, QuantAttention)
register_twin(TimmLayerNorm, QuantLayerNorm)
register_family(VisionTransformer, "vit")
