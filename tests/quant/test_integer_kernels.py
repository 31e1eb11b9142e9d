"""The optimized integer kernels against their straightforward int64 definitions, bit for bit.

`vitq.quant.integer` (the `quant.integer=exact` kernels) evaluates its integer arithmetic on float64 where
the bounds make that exact, looks i-exp up in a table and derives log2 codes from float bits. Each `ref_*`
function below is the plain int64 definition (int64 tensors throughout, a bit loop for floor(log2), int64
division); those tests assert equality, never closeness, on random inputs and edge cases: rounding ties,
zero exponentials, masks with -inf, coarse and very fine score grids, and grids wide enough to need the
int64 fallback. i-exp itself is checked against values worked by hand and against e^x.
FQ-ViT's own arithmetic (`quant.integer=fqvit`, the default) is tested in test_integer_fqvit.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from vitq.quant.integer import (exp_limit, exp_table, int_exp, int_layernorm,
                                int_softmax_log2, int_softmax_log2_codes, isqrt, ln_constants, ln_std_bits,
                                log_round_codes, LN_FRACTION_BITS)
from vitq.quant.modules import QuantLayerNorm, QuantSoftmax
from vitq.quant.log_grids import Log2Quantizer
from vitq.quant.quantizers import PTFQuantizer, UniformQuantizer


# ---------------------------------------------------------------------------------------------------
# reference definitions (int64 throughout)
# ---------------------------------------------------------------------------------------------------

def ref_log_round_codes(num: torch.Tensor, den: torch.Tensor, max_code: int) -> torch.Tensor:
    num, den = num.long(), den.long()
    zero = den <= 0
    den = den.clamp_min(1)
    q = torch.div(num, den, rounding_mode="floor")
    twice_rem = 2 * (num - q * den)
    n = q + ((twice_rem > den) | ((twice_rem == den) & (q % 2 == 1))).long()
    n = n.clamp_min(1)
    k = torch.zeros_like(n)
    for bit in (32, 16, 8, 4, 2, 1):  # floor(log2 n) by bisection
        step = (n >> (k + bit)) > 0
        k = torch.where(step, k + bit, k)
    k = k + (2 * n >= 3 * (1 << k)).long()
    return torch.where(zero | (k > max_code), torch.full_like(k, max_code + 1), k)


def ref_int_softmax_log2(codes, zero_point, scale, bits, mask=None):
    x = codes.long() - int(zero_point)
    if mask is not None:
        x = x + torch.nan_to_num(mask.double() / scale, neginf=-(2**40)).round().long()
    x = x - x.amax(dim=-1, keepdim=True)
    e = int_exp(x, scale)  # checked against hand values and e^x in test_int_exp_*
    total = e.sum(dim=-1, keepdim=True)
    return ref_log_round_codes(total.expand_as(e), e, 2**bits - 1), e, total


def ref_int_layernorm(codes, zero_point, alpha, gamma, beta, out_scale, out_zero_point, out_qmin, out_qmax):
    x = (codes.long() - int(zero_point)) << alpha.long()
    C = x.shape[-1]
    one = 1 << LN_FRACTION_BITS
    G = torch.round(gamma.double() / out_scale * one).long()
    B = torch.round(beta.double() / out_scale * one).long()
    std_bits = ln_std_bits(C, int(x.abs().max()) if x.numel() else 0, int(G.abs().max()) if G.numel() else 0)
    s1 = x.sum(-1, keepdim=True)
    s2 = (x * x).sum(-1, keepdim=True)
    t = (C * x - s1) << std_bits
    D = isqrt((C * s2 - s1 * s1) << (2 * std_bits)).clamp_min(1)
    y = torch.div(2 * (G * t) + D, 2 * D, rounding_mode="floor") + B
    out = torch.div(y + one // 2, one, rounding_mode="floor") + int(out_zero_point)
    return out.clamp(out_qmin, out_qmax)


# ---------------------------------------------------------------------------------------------------
# log_round_codes
# ---------------------------------------------------------------------------------------------------

def _ratio_cases(g: torch.Generator, count: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (num, den) with num >= den, plus exact ties num / den = m + 1/2 around every code boundary."""
    num = torch.randint(1, top, (count,), generator=g, dtype=torch.int64)
    shift = torch.rand(count, generator=g, dtype=torch.float64) * 40
    den = (num.double() / 2.0**shift).floor().long().clamp(1)
    den = torch.minimum(den + torch.randint(-1, 3, den.shape, generator=g), num).clamp_min(1)
    ties_n, ties_d = [], []
    for d in (1, 2, 3, 5, 1000, 2**20, 2**20 - 1):
        for j in range(0, 30):
            for n2 in (3 * 2**j - 1, 3 * 2**j + 1, 2**(j + 1) - 1, 2**(j + 1) + 1, 3 * 2**j - 3):  # 2 n = odd
                if n2 > 0:
                    ties_n.append(n2 * d)
                    ties_d.append(2 * d)  # num / den = n2 / 2 exactly: a tie of round half to even
    num = torch.cat([num, torch.tensor(ties_n)])
    den = torch.cat([den, torch.tensor(ties_d)])
    return num, den


@pytest.mark.parametrize("bits", [1, 4, 8, 16])
def test_log_round_codes_equal_reference(bits):
    g = torch.Generator().manual_seed(bits)
    num, den = _ratio_cases(g, 50000, 2**40)
    den[:50] = 0  # zero exponentials
    den[50:60] = -3
    max_code = 2**bits - 1
    want = ref_log_round_codes(num, den, max_code)
    assert torch.equal(log_round_codes(num, den, max_code), want)
    assert torch.equal(log_round_codes(num, den, max_code, dtype=torch.int32), want)
    if bits == 4:
        assert set(want.tolist()) == set(range(17))


def test_log_round_codes_int64_fallback_beyond_2_52():
    g = torch.Generator().manual_seed(5)
    num, den = _ratio_cases(g, 20000, 2**62)
    num[0] = 2**62 + 1
    for max_code in (15, 255, 65535):
        assert torch.equal(log_round_codes(num, den, max_code), ref_log_round_codes(num, den, max_code))


def test_log_round_codes_broadcast_total():
    total = torch.tensor([[1000], [7]])
    e = torch.tensor([[1000, 400, 0, 1], [7, 2, 3, 0]])
    assert torch.equal(log_round_codes(total, e, 15), ref_log_round_codes(total.expand_as(e), e, 15))


# ---------------------------------------------------------------------------------------------------
# int_exp table and int_softmax_log2
# ---------------------------------------------------------------------------------------------------

SCALES = [0.6, 0.25, 0.0854, 0.02, 1e-3, 2e-5]  # 2e-5: limit beyond 2^16 (table over the occurring range)


def test_int_exp_by_hand():
    """s = 0.25, fixed point unit s / 2^12: ln 2 -> round(11356.52) = 11357, b / 2a -> round(22178.41)
    = 22178, c - b^2 / 4a -> round(257620933.31) = 257620933; z0 = 22178^2 + c = 749484617.
    x = -1: xf = -4096, q = 0, r = -4096, z = 18082^2 + c = 584579657, e = floor(2^20 z / z0) = 817863.
    x = -3: xf = -12288, q = 1, r = -931, z = 21247^2 + c = 709055942, floor(2^20 z / z0) = 992012, >> 1.
    x = -100: clamped to -(30 + 1)(11357 >> 12 + 1) = -93, q = floor(380928 / 11357) = 33 > 30: 0."""
    assert int_exp(torch.tensor([0, -1, -3, -100]), 0.25).tolist() == [2**20, 817863, 496006, 0]


@pytest.mark.parametrize("scale", SCALES)
def test_int_exp_follows_e_to_the_x(scale):
    """2^20 e^(x s) within I-BERT's polynomial error: the fit 0.35815147 r^2 + 0.96963238 r + 1 is within
    2e-3 of e^r on (-ln 2, 0] (measured 1.9e-3 after the fixed-point rounding), and every octave halves
    exactly, so the bound holds absolutely at every x (relatively 0.5 % while e^(x s) > 2^-10). A floored
    ln 2 step, as FQ-ViT's, is off by 9 % after one octave at s = 0.6."""
    u = torch.arange(min(exp_limit(scale), 200000))
    e = int_exp(-u, scale).double() / 2**20
    ref = torch.exp(-u.double() * scale)
    assert float((e - ref).abs().max()) <= 2e-3
    big = ref > 2**-10
    assert float(((e - ref).abs() / ref)[big].max()) <= 5e-3


@pytest.mark.parametrize("scale", SCALES)
def test_exp_table_is_int_exp(scale):
    limit = exp_limit(scale)
    size = min(limit + 3, 70000)
    u = torch.arange(size)
    assert torch.equal(exp_table(scale, size), int_exp(-u, scale).double())
    assert exp_table(scale, size).dtype == torch.float64
    if limit < size:
        assert exp_table(scale, size)[limit:].eq(0).all()  # beyond the clamp: underflow


def _scores(g, shape, bits, spread):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    c = (torch.randn(shape, generator=g) * spread).round().clamp(qmin, qmax)
    c[..., 0, :] = qmax  # a row of ties at the top
    c[..., 1, 1:] = qmin  # one max and the rest at the bottom of the grid
    return c


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("out_bits", [2, 4, 8, 16])
def test_int_softmax_equals_reference(scale, out_bits):
    g = torch.Generator().manual_seed(int(scale * 1e5) + out_bits)
    for in_bits, spread in ((8, 40.0), (8, 400.0), (16, 3000.0)):
        codes = _scores(g, (2, 3, 24, 37), in_bits, spread)
        zp = 7
        want = ref_int_softmax_log2(codes, zp, scale, out_bits)
        for c in (codes, codes.long(), codes.double()):
            got = int_softmax_log2(c, zp, scale, out_bits)
            for a, b in zip(got, want):
                assert torch.equal(a, b) and a.dtype == torch.int64
        got32 = int_softmax_log2_codes(codes, zp, scale, out_bits)
        assert got32.dtype == torch.int32 and torch.equal(got32, want[0])


@pytest.mark.parametrize("scale", [0.6, 0.0854, 1e-3, 2e-5])
@pytest.mark.parametrize("fill", [float("-inf"), -100.0, -3.0, -1e4])
def test_int_softmax_masked_equals_reference(scale, fill):
    g = torch.Generator().manual_seed(1)
    codes = _scores(g, (4, 2, 20, 20), 8, 50.0)
    mask = torch.where(torch.rand(4, 1, 20, 20, generator=g) < 0.3, torch.tensor(fill), torch.tensor(0.0))
    mask[0, 0, 3] = fill  # a fully masked row
    mask[1, 0, :, :5] = 0.37  # non-integer multiples of the step, positive too
    for bits in (4, 8):
        want = ref_int_softmax_log2(codes, -12, scale, bits, mask)
        got = int_softmax_log2(codes, -12, scale, bits, mask)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_int_softmax_zero_exponentials_and_whole_codes():
    """Coarse grid: differences beyond 31 octaves underflow to e = 0 and take the zero code."""
    codes = torch.tensor([[[127.0, -128.0, 126.0, 100.0, 60.0, -128.0]]])
    for scale in (0.6, 0.3):
        want = ref_int_softmax_log2(codes, 0, scale, 4)
        got = int_softmax_log2(codes, 0, scale, 4)
        assert (want[1] == 0).any()
        for a, b in zip(got, want):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# int_layernorm
# ---------------------------------------------------------------------------------------------------

def _ln_case(g, C, in_bits, max_alpha, gamma_scale, out_scale, rows=(3, 17)):
    qmax = 2**in_bits - 1
    codes = torch.randint(0, qmax + 1, (*rows, C), generator=g).float()
    codes[0, 0] = 100 % (qmax + 1)  # a constant row: zero variance (D clamped to 1)
    codes[0, 1, :] = 0
    codes[0, 1, 0] = qmax  # one outlier
    zp = int(torch.randint(0, qmax + 1, (1,), generator=g))
    alpha = torch.randint(0, max_alpha + 1, (C,), generator=g).float()
    gamma = gamma_scale * (1 + torch.randn(C, generator=g))
    beta = torch.randn(C, generator=g)
    return codes, zp, alpha, gamma, beta, out_scale, qmax


@pytest.mark.parametrize("C,in_bits,max_alpha,gamma_scale,out_scale", [
    (4, 8, 0, 1.0, 0.25),
    (64, 8, 3, 1.0, 0.05),
    (384, 8, 3, 1.0, 0.03),  # DeiT-S shape
    (384, 8, 3, 20.0, 0.002),  # large gamma / s_out: fewer std bits or the int64 fallback
    (768, 12, 3, 3.0, 0.01),  # wide grid: the int64 fallback
    (192, 16, 8, 1.0, 0.02),  # very wide grid: std bits reduced below LN_STD_BITS
    (96, 4, 2, 0.5, 0.5),
])
def test_int_layernorm_equals_reference(C, in_bits, max_alpha, gamma_scale, out_scale):
    g = torch.Generator().manual_seed(C + in_bits)
    codes, zp, alpha, gamma, beta, s_out, qmax = _ln_case(g, C, in_bits, max_alpha, gamma_scale, out_scale)
    for out_zp, lo, hi in ((3, 0, 255), (0, -128, 127), (-5, -(2**15), 2**15 - 1)):
        args = (zp, alpha, gamma, beta, s_out, out_zp, lo, hi)
        try:
            want = ref_int_layernorm(codes, *args)
        except OverflowError:
            with pytest.raises(OverflowError):
                int_layernorm(codes, *args)
            continue
        assert torch.equal(int_layernorm(codes, *args), want)
        assert int_layernorm(codes, *args).dtype == torch.int64
        for bounds in ((None, None), (0, qmax)):
            k = ln_constants(*args, *bounds)
            got = int_layernorm(codes, *args, constants=k, dtype=torch.float32)
            assert got.dtype == torch.float32 and torch.equal(got, want.float())


def test_int_layernorm_fallback_is_exercised(monkeypatch):
    """A 12-bit grid over 768 channels with alpha = 3 does not fit the float64 bounds: the kernel must take
    the int64 path (seen through a spy) and still equal the reference."""
    import vitq.quant.integer as integer

    C = 768
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4096, (4, C), generator=g)
    alpha, gamma, beta = torch.full((C,), 3.0), torch.full((C,), 3.0), torch.randn(C, generator=g)
    calls = []
    real = integer._int_layernorm_int64
    monkeypatch.setattr(integer, "_int_layernorm_int64", lambda *a: calls.append(1) or real(*a))
    got = integer.int_layernorm(codes, 2048, alpha, gamma, beta, 0.01, 0, -128, 127)
    assert calls == [1]
    assert torch.equal(got, ref_int_layernorm(codes, 2048, alpha, gamma, beta, 0.01, 0, -128, 127))


# ---------------------------------------------------------------------------------------------------
# the modules' integer paths (cached constants, lookups) against the reference kernels
# ---------------------------------------------------------------------------------------------------

def _int_softmax_module(scale: float, bits: int = 4) -> QuantSoftmax:
    m = QuantSoftmax()
    m.input_quantizer.quantizer = UniformQuantizer(8, symmetric=False)
    m.input_quantizer.quantizer.set_params(torch.tensor([scale]), torch.tensor([131.0]))
    m.output_quantizer.quantizer = Log2Quantizer(bits)
    m.input_quantizer.mode = m.output_quantizer.mode = "quant"
    m.integer = True
    return m


@pytest.mark.parametrize("masked", [False, True])
def test_quant_softmax_integer_forward_equals_reference(masked):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 30, 30, generator=g) * 3
    mask = torch.where(torch.rand(30, 30, generator=g) < 0.2, -math.inf, 0.0) if masked else None
    for scale in (0.05, 0.3):
        m = _int_softmax_module(scale)
        q_in, q_out = m.input_quantizer.quantizer, m.output_quantizer.quantizer
        codes, _, _ = ref_int_softmax_log2(q_in.to_codes(x), int(q_in.zero_point), scale, 4, mask)
        with torch.no_grad():
            assert torch.equal(m(x, mask=mask), q_out.from_codes(codes.to(x.dtype)))


def test_quant_layernorm_integer_constants_cached_and_refreshed():
    C = 32
    g = torch.Generator().manual_seed(0)
    ln = QuantLayerNorm.convert(torch.nn.LayerNorm(C))
    ptf = PTFQuantizer(8, 3)
    ptf.set_ptf(torch.tensor([0.01]), torch.tensor([120.0]), torch.randint(0, 4, (C,), generator=g).float())
    ln.input_quantizer.quantizer = ptf
    out = UniformQuantizer(8)
    out.set_params(torch.tensor([0.04]), torch.tensor([128.0]))
    ln.feeds(type("P", (), {"quantizer": out})())
    ln.integer = True
    x = ptf(torch.randn(4, 9, C, generator=g) * 2)

    def expected():
        codes = ref_int_layernorm(ptf.to_codes(x), 120, ptf.alpha, ln.weight.detach(), ln.bias.detach(), 0.04,
                                  128, out.qmin, out.qmax)
        return out.from_codes(codes.float())

    with torch.no_grad():
        first = ln.normalize(x)
        assert torch.equal(first, expected())
        k = ln.integer_constants()
        assert ln.integer_constants() is k  # reused
        ln.weight.mul_(1.7)  # an in-place change bumps the version: constants are recomputed
        assert ln.integer_constants() is not k
        assert torch.equal(ln.normalize(x), expected())
        out.set_params(torch.tensor([0.02]), torch.tensor([100.0]))  # a new output grid
        codes = ref_int_layernorm(ptf.to_codes(x), 120, ptf.alpha, ln.weight, ln.bias, 0.02, 100, 0, 255)
        assert torch.equal(ln.normalize(x), out.from_codes(codes.float()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda_equal_reference():
    g = torch.Generator().manual_seed(0)
    codes = _scores(g, (2, 3, 24, 37), 8, 60.0)
    mask = torch.where(torch.rand(24, 37, generator=g) < 0.3, -math.inf, 0.0)
    for m in (None, mask):
        want = ref_int_softmax_log2(codes, 3, 0.05, 4, m)
        got = int_softmax_log2(codes.cuda(), 3, 0.05, 4, None if m is None else m.cuda())
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b)
    c, zp, alpha, gamma, beta, s_out, _ = _ln_case(g, 384, 8, 3, 1.0, 0.03)
    want = ref_int_layernorm(c, zp, alpha, gamma, beta, s_out, 3, 0, 255)
    got = int_layernorm(c.cuda(), zp, alpha.cuda(), gamma.cuda(), beta.cuda(), s_out, 3, 0, 255)
    assert torch.equal(got.cpu(), want)


def test_int_softmax_elementwise_exp_beyond_the_table():
    """A very fine grid with a -inf mask: the occurring differences exceed EXP_TABLE_MAX entries, so i-exp
    runs elementwise (int64); still the reference, bit for bit."""
    from vitq.quant.integer import EXP_TABLE_MAX
    scale = 3e-6  # near the finest step i-exp's int64 constants allow
    assert exp_limit(scale) > EXP_TABLE_MAX
    g = torch.Generator().manual_seed(2)
    codes = _scores(g, (2, 2, 9, 11), 16, 9000.0)
    mask = torch.where(torch.rand(9, 11, generator=g) < 0.3, -math.inf, 0.0)
    mask[:, 0] = 0.0
    want = ref_int_softmax_log2(codes, 0, scale, 4, mask)
    got = int_softmax_log2(codes, 0, scale, 4, mask)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
