"""Integer-only kernels for FQ-ViT: LayerNorm from PTF codes, i-exp softmax with log2 codes (LIS),
and attn.V as bit shifts. All arithmetic on int64 tensors; floats appear only in offline constants.
"""
from __future__ import annotations

import math

import torch

LN_FRACTION_BITS = 16  # fixed-point precision of gamma / s_out and beta / s_out
LN_STD_BITS = 8  # fraction bits of the integer standard deviation (fewer only where int64 needs it)
EXP_FRACTION_BITS = 12  # i-exp works on the score grid refined by 2^12
EXP_POLY = (0.35815147, 0.96963238, 1.0)  # e^r ~ a r^2 + b r + c on (-ln 2, 0] (I-BERT's fit)
EXP_OCTAVES = 30  # exponents below 2^-30 underflow to 0
EXP_BITS = 20  # i-exp output scaled to 2^EXP_BITS at r = 0


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
    one = 1 << LN_FRACTION_BITS
    G = torch.round(gamma.double() / out_scale * one).long()
    B = torch.round(beta.double() / out_scale * one).long()
    std_bits = ln_std_bits(C, int(x.abs().max()) if x.numel() else 0, int(G.abs().max()) if G.numel() else 0)
    s1 = x.sum(-1, keepdim=True)
    s2 = (x * x).sum(-1, keepdim=True)
    t = (C * x - s1) << std_bits
    D = isqrt((C * s2 - s1 * s1) << (2 * std_bits)).clamp_min(1)  # C * std, with std_bits fraction bits
    y = _round_div(G * t, D) + B  # output codes in units of 2^-F
    out = torch.div(y + one // 2, one, rounding_mode="floor") + int(out_zero_point)
    return out.clamp(out_qmin, out_qmax)


def ln_std_bits(channels: int, x_max: int, g_max: int) -> int:
    """Fraction bits for the integer standard deviation: LN_STD_BITS where int64 allows, fewer for wide
    grids; raises where even none fit (then the grid is too wide for integer LayerNorm)."""
    var_bits = (channels * channels * max(x_max, 1) ** 2).bit_length()  # bound of C sum(x^2) - sum(x)^2
    prod_bits = (max(g_max, 1) * 2 * channels * max(x_max, 1)).bit_length()  # bound of G t
    bits = min(LN_STD_BITS, (62 - var_bits) // 2, 62 - prod_bits)
    if bits < 0:
        raise OverflowError(
            f"integer LayerNorm over {channels} channels with |x| up to {x_max} (PTF codes << alpha) and "
            f"|gamma / s_out| up to {g_max / (1 << LN_FRACTION_BITS):.3g} exceeds int64; use fewer bits or a "
            f"smaller PTF max_factor, or keep quant.integer=false")
    return bits


def exp_constants(scale: float) -> tuple[int, int, int]:
    """Fixed-point constants of i-exp for an input grid of step `scale` (EXP_FRACTION_BITS below s):
    ln 2 / s, and b, c with e^r ~ a s^2 2^-2F ((r + b)^2 + c) for r in (-ln 2, 0]."""
    a, b, c = EXP_POLY
    if not 0 < scale < math.log(2):
        raise ValueError(f"integer softmax needs an input step in (0, ln 2), got {scale}")
    unit = scale / (1 << EXP_FRACTION_BITS)
    ln2 = round(math.log(2) / unit)
    b_int = round(b / (2 * a) / unit)
    c_int = round((c - b * b / (4 * a)) / (a * unit * unit))
    return ln2, b_int, c_int


def int_exp(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Integer exponential for x <= 0 (integer units of `scale`), scaled by 2^EXP_BITS (after I-BERT).

    x = -q ln2 + r with ln 2 held in fixed point, so every octave is an exact halving (a floored
    ln 2 / s step, as in I-BERT, drifts by e^(s floor(-ln2/s)) / 0.5 per octave); e^r comes from a
    second-order polynomial on the fixed-point remainder, then a right shift by q.
    """
    ln2, b_int, c_int = exp_constants(scale)
    xf = x.long().clamp_min(-(EXP_OCTAVES + 1) * ((ln2 >> EXP_FRACTION_BITS) + 1)) << EXP_FRACTION_BITS
    q = torch.div(-xf, ln2, rounding_mode="floor")  # octave, >= 0
    r = xf + q * ln2  # in (-ln2, 0], units of s 2^-F
    z = (r + b_int) ** 2 + c_int  # ~ e^r / (a unit^2)
    z0 = b_int * b_int + c_int  # the same at r = 0, for normalization
    drop = max(0, z0.bit_length() - 40)  # keep (z << EXP_BITS) inside int64 on fine grids
    e = torch.div((z >> drop) << EXP_BITS, z0 >> drop, rounding_mode="floor")
    return torch.where(q > EXP_OCTAVES, torch.zeros_like(e), e >> q.clamp_max(EXP_OCTAVES))


def log_round_codes(num: torch.Tensor, den: torch.Tensor, max_code: int) -> torch.Tensor:
    """Codes k of 2^-k for p = den / num, as FQ-ViT defines LIS: n = round(num / den) (half to even), then
    k = floor(log2 n), plus one when n >= 1.5 * 2^floor(log2 n). Codes beyond max_code (and den <= 0)
    become max_code + 1 (dequantized to 0). Integer arithmetic throughout."""
    num, den = num.long(), den.long()
    zero = den <= 0
    den = den.clamp_min(1)
    q = torch.div(num, den, rounding_mode="floor")
    twice_rem = 2 * (num - q * den)
    n = q + ((twice_rem > den) | ((twice_rem == den) & (q % 2 == 1))).long()
    n = n.clamp_min(1)
    k = torch.zeros_like(n)
    for bit in (16, 8, 4, 2, 1):  # floor(log2 n), capped at 31 (far beyond any code)
        step = (1 << (k + bit)) <= n
        k = torch.where(step, k + bit, k)
    k = k + (2 * n >= 3 * (1 << k)).long()
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
