"""FQ-ViT's integer LayerNorm and softmax as its released code computes them (`models/ptq/layers.py`:
`QIntLayerNorm` in mode 'int', `QIntSoftmax.int_softmax` and `log_round`), the default arithmetic of
`quant.integer` for `quant=fqvit`.

What makes it FQ-ViT's rather than `integer.py`'s exact kernels:
- LayerNorm: mean and standard deviation in floating point from the integer codes, and one dyadic
  multiplier per element, `|A| ~ M / 2^N` with an 8-bit M (`get_MN`), bias `B = round(. * 2^N)`;
- softmax: I-BERT's i-exp with floored constants, `x0 = floor(-0.6931 / s)` for the octave,
  `b = floor((b/a) / s)`, `c = floor((c/a) / s^2)`, 30 octaves, `e = z * 2^(30 - q)`.
The code evaluates these in float32; here they run in float64, where every integer of the softmax is
exact while a row sum stays below 2^53 (s >= 0.01 on 197 tokens), so the only differences from the
code are its float32 roundings.
"""
from __future__ import annotations

import math

import torch

from .integer import _codes_from_rounded

MN_BITS = 8  # FQ-ViT's get_MN: bit = 8
LN2_CODE = 0.6931  # the code's -ln 2 constant (x0 = -0.6931)
OCTAVES = 30  # the code's n = 30
POLY = (0.35815147, 0.96963238, 1.0)  # a r^2 + b r + c, as the code's coef


def dyadic(a: torch.Tensor, bits: int = MN_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """M, N with a ~ M / 2^N: N = clamp(bits - 1 - floor(log2 a), 0, 31), M = clamp(floor(a 2^N), 0,
    2^bits - 1) (the code's get_MN; a = 0 gives M = 0)."""
    n = (bits - 1 - torch.floor(torch.log2(a))).clamp(0, 31)
    m = torch.floor(a * torch.exp2(n)).clamp(0, 2**bits - 1)
    return m, n


def layernorm_codes(codes: torch.Tensor, zero_point: int, alpha: torch.Tensor, base_scale: float,
                    gamma: torch.Tensor, beta: torch.Tensor, out_scale: float, out_zero_point: int,
                    out_qmin: int, out_qmax: int) -> torch.Tensor:
    """LayerNorm over the last axis from PTF codes to the next grid's codes (float64, integer-valued).

    x = (codes - zp) 2^(alpha - min alpha) on the finest input step s1 = base 2^(min alpha);
    mean = s1 mean(x), std = s1 / C sqrt(C sum(x^2) - sum(x)^2); A = s1 / std gamma / s_out as M / 2^N;
    B = round((beta - mean / std gamma) / s_out 2^N); codes = round((sign(A) M x + B) / 2^N) + zp_out,
    clamped to the output grid (the consumer's quantizer clamps in the code). A row whose codes are all
    equal (std = 0, NaN in the code) is treated as having one unit of spread.
    """
    alpha = alpha.detach().to(torch.float64)
    low = float(alpha.min())
    s1 = float(base_scale) * 2.0 ** low
    x = (codes.to(torch.float64) - zero_point) * torch.exp2(alpha - low)
    C = x.shape[-1]
    total = x.sum(-1, keepdim=True)
    mean = total / C * s1
    std = (s1 / C) * torch.sqrt((C * (x * x).sum(-1, keepdim=True) - total * total).clamp_min(1.0))
    g = gamma.detach().to(torch.float64)
    a = (s1 / std) * g / out_scale
    m, n = dyadic(a.abs())
    shift = torch.exp2(n)
    b = torch.round((beta.detach().to(torch.float64) - mean / std * g) / out_scale * shift)
    y = torch.round((torch.sign(a) * m * x + b) / shift)
    return (y + out_zero_point).clamp_(out_qmin, out_qmax)


def exp_constants(scale: float) -> tuple[float, float, float]:
    """x0 = floor(-0.6931 / s), b = floor((b/a) / s), c = floor((c/a) / s^2): the code's floored i-exp
    constants for a score step s."""
    a, b, c = POLY
    return math.floor(-LN2_CODE / scale), math.floor(b / a / scale), math.floor(c / a / scale**2)


def int_exp(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The code's i-exp of integer scores x <= 0 (float64): max(x, 30 x0) = q x0 + r,
    e = max(floor((r (r + b) + c) 2^(30 - q)), 0)."""
    x0, b, c = exp_constants(scale)
    x = torch.maximum(x, torch.tensor(OCTAVES * x0, dtype=x.dtype, device=x.device))
    q = torch.floor(x / x0)
    r = x - x0 * q
    z = r * (r + b) + c
    return torch.floor(z * torch.exp2(OCTAVES - q)).clamp_min_(0)


def softmax_codes(codes: torch.Tensor, zero_point: int, scale: float, bits: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log2 codes of the softmax over the last axis (int32): the scores' integers minus their row maximum
    through `int_exp`, n = round(sum / e) (half to even), then the code's log_round; codes beyond
    2^bits - 1 (and e = 0) are 2^bits, which dequantizes to 0. `mask` (additive, real-valued) joins
    the scores on their grid, as in `integer.int_softmax_log2`."""
    x = codes.to(torch.float64) - zero_point
    if mask is not None:
        x = x + torch.nan_to_num(mask.double() / scale, neginf=-(2.0**40)).round()
    x = x - x.amax(dim=-1, keepdim=True)
    e = int_exp(x, scale)
    n = torch.div(e.sum(dim=-1, keepdim=True), e).round_()  # e = 0 gives inf: the zero code
    return _codes_from_rounded(n.clamp_min_(1.0), 2**bits - 1)
