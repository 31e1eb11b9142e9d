"""Integer-only kernels for FQ-ViT: LayerNorm from PTF codes, i-exp softmax with log2 codes (LIS),
and attn.V as bit shifts.

The arithmetic is defined on integers (int64); floats appear only in offline constants. For speed the
kernels evaluate that arithmetic on the narrowest representation that is provably exact for the inputs
at hand and fall back to plain int64 otherwise:
- integers below 2^53 are exact in float64, so sums and products bounded below 2^53 are computed there
  (vectorized, unlike int64 division), and floor(a / b) of two such integers is floor(fl(a / b)) (the
  correctly rounded quotient cannot cross an integer, which lies at least 1/b away, while
  |a/b| 2^-53 < 1/b);
- i-exp depends only on the integer score difference to the row maximum, which spans few values, so it is
  tabulated once per grid (`exp_table`) and looked up;
- log_round(round(s / e)) needs no loop: float64 rounding of s / e keeps round-half-even exact while
  s < 2^52, and floor(log2 n) plus the 1.5 * 2^k test is one add and one shift on n's float bits.
The int64 definitions stay in tests/quant/test_integer_kernels.py, which compares them bit for bit.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


class LNConstants(NamedTuple):
    """Offline constants of one integer LayerNorm (`ln_constants`): G = round(gamma / s_out 2^F) and
    B = round(beta / s_out 2^F) (int64), the PTF shifts 2^alpha (float64), and max |G|."""
    zero_point: int
    alpha: torch.Tensor  # int64
    pow2_alpha: torch.Tensor  # float64
    G: torch.Tensor
    B: torch.Tensor
    g_max: int
    b_max: int
    out_zero_point: int
    out_qmin: int
    out_qmax: int
    x_bound: int | None  # max |(code - zp) << alpha| over the input grid (None: unknown, measured per call)


def ln_constants(zero_point: int, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 out_scale: float, out_zero_point: int, out_qmin: int, out_qmax: int,
                 in_qmin: int | None = None, in_qmax: int | None = None) -> LNConstants:
    """Constants for `int_layernorm`; with the input grid's code range (in_qmin, in_qmax), which the
    codes must then respect, the kernel can bound |x| without a pass over the data."""
    one = 1 << LN_FRACTION_BITS
    G = torch.round(gamma.detach().double() / out_scale * one).long()
    B = torch.round(beta.detach().double() / out_scale * one).long()
    alpha = alpha.detach().long()
    return LNConstants(int(zero_point), alpha, torch.ldexp(torch.ones_like(alpha, dtype=torch.float64), alpha),
                       G, B, int(G.abs().max()) if G.numel() else 0, int(B.abs().max()) if B.numel() else 0,
                       int(out_zero_point), int(out_qmin), int(out_qmax),
                       None if in_qmin is None or in_qmax is None or not alpha.numel()
                       else max(int(in_qmax) - int(zero_point), int(zero_point) - int(in_qmin), 0)
                       << int(alpha.max()))


def int_layernorm(
    codes: torch.Tensor, zero_point: int, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
    out_scale: float, out_zero_point: int, out_qmin: int, out_qmax: int,
    constants: LNConstants | None = None, dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """LayerNorm over the last axis from PTF codes to the output quantizer's codes (as `dtype`).

    x = (codes - zp) << alpha_c puts every channel on the finest scale; with C channels,
    t = C x - sum(x) and D = isqrt(C sum(x^2) - sum(x)^2), the normalized value is t / D. gamma and
    beta are folded offline into fixed-point multipliers of the output grid (LN_FRACTION_BITS); a caller
    that runs one LayerNorm repeatedly passes them precomputed (`constants`, from `ln_constants`).
    Output: round(round(G t / D) + B) / 2^F) + zp_out (halves up), clamped.

    Evaluated in float64 where every intermediate integer provably stays below 2^53 (see the module
    docstring), in int64 otherwise.
    """
    k = constants or ln_constants(zero_point, alpha, gamma, beta, out_scale, out_zero_point, out_qmin, out_qmax)
    C = codes.shape[-1]
    one = 1 << LN_FRACTION_BITS
    x = codes.double().sub_(k.zero_point).mul_(k.pow2_alpha)  # exact while codes are below 2^53 / 2^alpha
    # std_bits is defined by the data's max |x|; a grid bound that already allows LN_STD_BITS (the most)
    # gives the same value, as ln_std_bits never grows with x_max
    if k.x_bound is not None and ln_std_bits(C, k.x_bound, k.g_max) == LN_STD_BITS:
        x_max = k.x_bound  # an upper bound of the data's: only used for the exactness bounds below
        std_bits = LN_STD_BITS
    else:
        x_max = 0
        if x.numel():
            lo, hi = torch.aminmax(x)
            x_max = int(max(float(hi), -float(lo)))
        std_bits = ln_std_bits(C, x_max, k.g_max)
    prod = 2 * (2 * C * x_max << std_bits) * max(k.g_max, 1) + (C * x_max << std_bits) + 1  # |2 G t + D|
    if not (C * max(x_max, 1) ** 2 < 2**53 and prod + k.b_max + (abs(k.out_zero_point) + 1) * one < 2**53):
        x = (codes.long() - k.zero_point) << k.alpha
        return _int_layernorm_int64(x, k, std_bits).to(dtype)
    s1 = x.sum(-1, keepdim=True)
    s2 = torch.linalg.vecdot(x, x).unsqueeze(-1)
    s1i, s2i = s1.long(), s2.long()
    D = isqrt((C * s2i - s1i * s1i) << (2 * std_bits)).clamp_min(1)  # C * std, with std_bits fraction bits
    D2 = (2 * D).double()  # <= 2 C x_max 2^std_bits
    # 2 G t + D with t = (C x - s1) << std_bits: integers below 2^53 (bounded above)
    a = x.mul_(C).sub_(s1).mul_(((2 << std_bits) * k.G).double()).add_(D.double())
    y = a.div_(D2).floor_()  # round(G t / D), exact (floor of the correctly rounded quotient)
    out = y.add_((k.B + one // 2 + k.out_zero_point * one).double()).mul_(1.0 / one).floor_()
    return out.clamp_(k.out_qmin, k.out_qmax).to(dtype)


def _int_layernorm_int64(x: torch.Tensor, k: LNConstants, std_bits: int) -> torch.Tensor:
    """The integer LayerNorm in int64 on x = (codes - zp) << alpha (the fallback for wide grids)."""
    C = x.shape[-1]
    one = 1 << LN_FRACTION_BITS
    s1 = x.sum(-1, keepdim=True)
    s2 = (x * x).sum(-1, keepdim=True)
    t = (C * x - s1) << std_bits
    D = isqrt((C * s2 - s1 * s1) << (2 * std_bits)).clamp_min(1)
    y = _round_div(k.G * t, D) + k.B
    out = torch.div(y + one // 2, one, rounding_mode="floor") + k.out_zero_point
    return out.clamp(k.out_qmin, k.out_qmax)


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
            f"smaller PTF max_factor, quant.integer=fqvit (FQ-ViT's arithmetic) or quant.integer=false")
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


def log_round_codes(num: torch.Tensor, den: torch.Tensor, max_code: int,
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Codes k of 2^-k for p = den / num, as FQ-ViT defines LIS: n = round(num / den) (half to even), then
    k = floor(log2 n), plus one when n >= 1.5 * 2^floor(log2 n). Codes beyond max_code (and den <= 0)
    become max_code + 1 (dequantized to 0). Exact integer semantics (int64 where num reaches 2^52)."""
    if num.is_floating_point() or den.is_floating_point() or _int_bound(num) >= 2**52:
        return _log_round_codes_int64(num, den, max_code).to(dtype)
    n = torch.div(num.double(), den.double()).round_().clamp_min_(1.0)  # exact: num < 2^52
    n = n.masked_fill_(den <= 0, math.inf)
    return _codes_from_rounded(n, max_code).to(dtype)


def _int_bound(t: torch.Tensor) -> int:
    """max |t| of an integer tensor (0 if empty)."""
    if t.numel() == 0:
        return 0
    lo, hi = torch.aminmax(t)
    return max(int(hi), -int(lo))


def _codes_from_rounded(n: torch.Tensor, max_code: int) -> torch.Tensor:
    """log_round codes of float64 integers n >= 1 (n < 2^53, or inf), capped at max_code + 1: int32.
    floor(log2 n) is n's exponent field and the 1.5 * 2^k test is the top mantissa bit, so adding that bit
    carries into the exponent exactly when the code rounds up."""
    zero = None
    if max_code + 1 <= 1000:
        n = n.clamp_max_(2.0 ** (max_code + 1))  # every n from here up (inf included) has code max_code + 1
    else:
        zero = torch.isinf(n)
    if max_code + 1 <= 24:  # n <= 2^24: exact in float32
        k = n.to(torch.float32).view(torch.int32)
        k = k.add_(1 << 22).bitwise_right_shift_(23).sub_(127)
    else:
        k = n.view(torch.int64).add(1 << 51).bitwise_right_shift_(52).sub_(1023)
        k = k.clamp_max_(max_code + 1).to(torch.int32)
    if max_code + 1 > 1000:
        k = k.masked_fill_(zero, max_code + 1)
    return k


def _log_round_codes_int64(num: torch.Tensor, den: torch.Tensor, max_code: int) -> torch.Tensor:
    """log_round_codes for any int64 num (the fallback): the same definition with int64 division."""
    num, den = num.long(), den.long()
    zero = den <= 0
    den = den.clamp_min(1)
    q = torch.div(num, den, rounding_mode="floor")
    twice_rem = 2 * (num - q * den)
    n = q + ((twice_rem > den) | ((twice_rem == den) & (q % 2 == 1))).long()
    n = n.clamp_min(1)
    k = torch.zeros_like(n)
    for bit in (32, 16, 8, 4, 2, 1):  # floor(log2 n) of n < 2^63
        step = (n >> (k + bit)) > 0
        k = torch.where(step, k + bit, k)
    k = k + (2 * (n - (1 << k)) >= (1 << k)).long()
    return torch.where(zero | (k > max_code), torch.full_like(k, max_code + 1), k)


def exp_limit(scale: float) -> int:
    """Score differences below -exp_limit(scale) (in units of the score step) give int_exp == 0, as does
    -exp_limit itself: int_exp clamps its input there."""
    ln2 = exp_constants(scale)[0]
    return (EXP_OCTAVES + 1) * ((ln2 >> EXP_FRACTION_BITS) + 1)


EXP_TABLE_MAX = 1 << 22  # largest i-exp lookup table (entries); beyond it int_exp runs elementwise


@functools.lru_cache(maxsize=256)
def _exp_table(scale: float, size: int, device: str) -> torch.Tensor:
    """int_exp(-u) for u = 0 .. size - 1, as float64 (the values are integers <= 2^EXP_BITS)."""
    u = torch.arange(size, dtype=torch.int64)
    return int_exp(-u, scale).double().to(device)


def exp_table(scale: float, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The i-exp lookup table of a score grid: entry u is int_exp(-u, scale) (read-only, cached)."""
    return _exp_table(float(scale), int(size), str(torch.device(device)))


def int_softmax_log2(
    codes: torch.Tensor, zero_point: int, scale: float, bits: int, mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer softmax over the last axis with LIS output codes.

    Returns (log2 codes as `dtype`, exp integers, row sums; both int64) so callers and tests can inspect
    every stage; `int_softmax_log2_codes` returns the codes alone, without the int64 copies.
    """
    out, e, total = _int_softmax_log2(codes, zero_point, scale, bits, mask, dtype)
    return out, e.long(), total.long()


def int_softmax_log2_codes(
    codes: torch.Tensor, zero_point: int, scale: float, bits: int, mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """The LIS codes of `int_softmax_log2` alone (as `dtype`; the model path)."""
    return _int_softmax_log2(codes, zero_point, scale, bits, mask, dtype)[0]


def _int_softmax_log2(
    codes: torch.Tensor, zero_point: int, scale: float, bits: int, mask: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, exponentials and row sums (the latter two as integer-valued float64, exact below 2^52).

    `codes` are integer-valued grid codes (any dtype; as floats, below 2^24 in magnitude). `mask` is an
    additive real-valued mask (e.g. -100 or -inf on masked positions).

    Definition: x = codes - zp (+ round(mask / scale)) minus its row maximum, e = int_exp(x), s = sum(e),
    codes = log_round_codes(s, e).
    """
    max_code = 2**bits - 1
    limit = exp_limit(scale)
    if mask is None and codes.is_floating_point():
        c = codes if codes.dtype in (torch.float32, torch.float64) else codes.float()
        u = c.amax(dim=-1, keepdim=True) - c  # -(x - max x) >= 0, exact (integers below 2^24)
    else:
        x = codes.long() - int(zero_point)
        if mask is not None:
            m = torch.nan_to_num(mask.double() / scale, neginf=-(2**40)).round().long()
            x = x + m
        u = x.amax(dim=-1, keepdim=True) - x
    if limit < (1 << 16):
        size = limit + 1
        u = u.clamp_max_(limit)
    else:  # a very fine score grid: tabulate only the differences that occur
        size = min(limit, int(u.max()) if u.numel() else 0) + 1
        u = u.clamp_max_(size - 1)
    if size <= EXP_TABLE_MAX:
        table = exp_table(scale, size, u.device)
        e = table.index_select(0, u.to(torch.int32).reshape(-1)).view(u.shape)
    else:
        e = int_exp(-u.long(), scale).double()
    total = e.sum(dim=-1, keepdim=True)  # exact: integers, far below 2^52
    if total.numel() and float(total.max()) >= 2.0**52:
        raise OverflowError("integer softmax row sums beyond 2^52")
    n = torch.div(total, e).round_()  # round(s / e), half to even, exact (see the module docstring)
    return _codes_from_rounded(n, max_code).to(dtype), e, total


def shift_matmul(attn_codes: torch.Tensor, v_codes: torch.Tensor, v_zero_point: torch.Tensor | int,
                 max_code: int) -> torch.Tensor:
    """attn.V with attn = 2^-code: every product is a shift of an integer V code. Returns the integer
    accumulator in units of 2^-max_code (multiply by v_scale * 2^-max_code to dequantize)."""
    v = v_codes.long() - (v_zero_point.long() if torch.is_tensor(v_zero_point) else int(v_zero_point))
    code = attn_codes.long()
    weights = torch.where(code > max_code, torch.zeros_like(code), 1 << (max_code - code.clamp(0, max_code)))
    return weights @ v
