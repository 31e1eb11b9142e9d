"""Adapter for timm SwinTransformer: window attention with relative position bias and shift masks."""
from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer, WindowAttention

from ..quant.modules import QuantMatMul, QuantSoftmax
from .registry import register_family, register_twin


class QuantWindowAttention(WindowAttention):
    """Window attention computed explicitly; the bias and shift mask are added before the softmax point."""

    @classmethod
    def convert(cls, module: WindowAttention) -> "QuantWindowAttention":
        module.__class__ = cls
        module.matmul_qk = QuantMatMul()
        module.softmax = QuantSoftmax(dim=-1)
        module.matmul_av = QuantMatMul(a_kind=None)
        return module

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul_av(attn, v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


register_twin(WindowAttention, QuantWindowAttention)
register_family(SwinTransformer, "swin")
