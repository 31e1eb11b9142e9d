"""Integer-only kernels for FQ-ViT: LayerNorm from PTF codes, i-exp softmax with log2 codes (LIS),
and attn.V as bit shifts. All arithmetic on int64 tensors; floats appear only in offline constants.
"""
from __future__ import annotations

import math

import torch

LN_FRACTION_BITS = 16  # fixed-point precision of gamma / s_out and beta / s_out
EXP_POLY = (0.35815147, 0.96963238, 1.0)  # e^r ~ a r^2 + b r + c on (-ln 2, 0] (I-BERT's fit)
EXP_OCTAVES = 30  # exponents below 2^-30 underflow to 0
EXP_BITS = 16  # i-exp output scaled to 2^EXP_BITS at r = 0


def _round_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """round(a / b) for integer tensors with b > 0, halves rounded up."""
    return torch.div(2 * a + b, 2 * b, rounding_mode="floor")


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) for non-negative int64 values below 2^52 (float estimate, then exact fix-up)."""
    r = torch.sqrt(n.double()).floor().long()
    r = torch.where(r * r > n, r - 1, r)
    return torch.where((r + 1) * (r + 1) <= n, r + 1, r)


def int_layernorm(
    codes: torch.Tensor, zero_point: int, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
    out_scale: float, out_zero_point: int, out_qmin: int, out_qmax: int,
) -> torch.Tensor:
    """LayerNorm over the last axis from PTF codes to the output quantizer's codes.

    x = (codes - zp) << alpha_c puts every channel on the finest scale; with C channels,
    t = C x - sum(x) and D = isqrt(C sum(x^2) - sum(x)^2), the normalized value is t / D. gamma and
    beta are folded offline into fixed-point multipliers of the output grid (LN_FRACTION_BITS).
    """
    x = (codes.long() - int(zero_point)) << alpha.long()
    C = x.shape[-1]
    s1 = x.sum(-1, keepdim=True)
    s2 = (x * x).sum(-1, keepdim=True)
    t = C * x - s1
    D = isqrt(C * s2 - s1 * s1).clamp_min(1)
    one = 1 << LN_FRACTION_BITS
    G = torch.round(gamma.double() / out_scale * one).long()
    B = torch.round(beta.double() / out_scale * one).long()
    y = _round_div(G * t, D) + B  # output codes in units of 2^-F
    out = torch.div(y + one // 2, one, rounding_mode="floor") + int(out_zero_point)
    return out.clamp(out_qmin, out_qmax)


def exp_constants(scale: float) -> tuple[int, int, int]:
    """Integer constants of i-exp for an input grid of step `scale`: (x0, b, c) with
    e^x ~ a s^2 ((r + b)^2 + c) 2^-q, x = q x0 + r."""
    a, b, c = EXP_POLY
    if scale >= math.log(2):
        raise ValueError(f"integer softmax needs an input step below ln 2, got {scale}")
    x0 = math.floor(-math.log(2) / scale)
    b_int = math.floor(b / (2 * a) / scale)
    c_int = math.floor((c - b * b / (4 * a)) / (a * scale * scale))
    return x0, b_int, c_int


def int_exp(x: torch.Tensor, scale: float) -> torch.Tensor:
    """I-BERT's integer exponential for x <= 0 (integer units of `scale`), scaled by 2^EXP_BITS."""
    x0, b_int, c_int = exp_constants(scale)
    x = x.long().clamp_min(EXP_OCTAVES * x0)
    q = torch.div(x, x0, rounding_mode="floor")  # x0 < 0, so q >= 0
    r = x - x0 * q  # in (x0, 0]
    z = (r + b_int) ** 2 + c_int  # ~ e^r / (a s^2)
    z0 = b_int * b_int + c_int  # the same at r = 0, for normalization
    return torch.div((z << EXP_BITS) >> q, z0, rounding_mode="floor")


def log_round_codes(num: torch.Tensor, den: torch.Tensor, max_code: int) -> torch.Tensor:
    """Codes k of 2^-k for p = den / num: k = floor(log2(num / den)), plus one when num / den is at least
    1.5 * 2^k (FQ-ViT's log round). Codes beyond max_code become max_code + 1 (dequantized to 0)."""
    num, den = num.long(), den.long()
    zero = den <= 0
    den = den.clamp_min(1)
    k = torch.zeros_like(num)
    for bit in (16, 8, 4, 2, 1):  # floor(log2(num / den)), capped at 31 (far beyond any code)
        step = (den << (k + bit)) <= num
        k = torch.where(step, k + bit, k)
    up = 2 * num >= 3 * (den << k)
    k = k + up.long()
    return torch.where(zero | (k > max_code), torch.full_like(k, max_code + 1), k)


def int_softmax_log2(
    codes: torch.Tensor, zero_point: int, scale: float, bits: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer softmax over the last axis with LIS output codes.

    Returns (log2 codes, exp integers, row sums) so callers and tests can inspect every stage.
    `mask` is an additive real-valued mask (e.g. -100 or -inf on masked positions).
    """
    x = codes.long() - int(zero_point)
    if mask is not None:
        m = torch.nan_to_num(mask.double() / scale, neginf=-(2**40)).round().long()
        x = x + m
    x = x - x.amax(dim=-1, keepdim=True)
    e = int_exp(x, scale)
    total = e.sum(dim=-1, keepdim=True)
    return log_round_codes(total.expand_as(e), e, 2**bits - 1), e, total


def shift_matmul(attn_codes: torch.Tensor, v_codes: torch.Tensor, v_zero_point: torch.Tensor | int,
                 max_code: int) -> torch.Tensor:
    """attn.V with attn = 2^-code: every product is a shift of an integer V code. Returns the integer
    accumulator in units of 2^-max_code (multiply by v_scale * 2^-max_code to dequantize)."""
    v = v_codes.long() - (v_zero_point.long() if torch.is_tensor(v_zero_point) else int(v_zero_point))
    code = attn_codes.long()
    weights = torch.where(code > max_code, torch.zeros_like(code), 1 << (max_code - code.clamp(0, max_code)))
    return weights @ v
