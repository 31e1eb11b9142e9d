"""FQ-ViT's integer LayerNorm and softmax (`vitq.quant.integer_fqvit`) against cases worked by hand from
the released code's definitions (`models/ptq/layers.py`: `QIntLayerNorm.get_MN` and mode 'int',
`QIntSoftmax.int_softmax` and `log_round`). Every expected number below is computed in the comments."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import vitq
from vitq.quant import integer_fqvit as fq
from vitq.quant.modules import QuantLayerNorm, QuantSoftmax


def test_floored_exp_constants_by_hand():
    # s = 0.1: x0 = floor(-0.6931 / 0.1) = floor(-6.931) = -7; b/a = 0.96963238 / 0.35815147 = 2.70733,
    # / 0.1 = 27.07 -> 27; c/a = 1 / 0.35815147 = 2.79211, / 0.01 = 279.2 -> 279
    assert fq.exp_constants(0.1) == (-7, 27, 279)
    # s = 0.3: floor(-2.310) = -3 (an octave of 0.9, not ln 2); 9.024 -> 9; 2.79211 / 0.09 = 31.02 -> 31
    assert fq.exp_constants(0.3) == (-3, 9, 31)


def test_int_exp_by_hand():
    x = torch.tensor([0.0, -7.0, -10.0, -210.0, -1000.0], dtype=torch.float64)
    # x = 0: q = 0, r = 0, z = 279, e = 279 * 2^30; x = -7: q = 1, r = 0 -> 279 * 2^29 (one floored octave)
    # x = -10: q = floor(-10 / -7) = 1, r = -10 + 7 = -3, z = -3 * (-3 + 27) + 279 = 207 -> 207 * 2^29
    # x = -210 = 30 x0: q = 30, r = 0 -> 279; x = -1000 is clamped to 30 x0 = -210 -> 279 (never 0)
    expected = [279 * 2**30, 279 * 2**29, 207 * 2**29, 279, 279]
    assert fq.int_exp(x, 0.1).tolist() == expected


@pytest.mark.parametrize("scale, scores, codes", [
    # s = 0.1, x - max = [0, -7, -10]: e = 2^29 [558, 279, 207], sum = 1044 * 2^29;
    # n = round(1044 / [558, 279, 207]) = round([1.871, 3.742, 5.043]) = [2, 4, 5];
    # log_round: 2 -> 1; 4 -> 2; 5 -> 2 (5 - 4 = 1 < 2)
    (0.1, [10, 3, 0], [1, 2, 2]),
    # s = 0.3, x - max = [0, -3, -6]: e = 31 * 2^28 [4, 2, 1], sum = 7 * 31 * 2^28;
    # n = [1.75, 3.5, 7] -> [2, 4 (half to even), 7]; log_round: 1, 2, 3 (7 - 4 = 3 >= 2)
    (0.3, [6, 3, 0], [1, 2, 3]),
])
def test_softmax_codes_by_hand(scale, scores, codes):
    got = fq.softmax_codes(torch.tensor([scores]), 0, scale, 4)
    assert got.tolist() == [codes]


def test_softmax_zero_code_beyond_the_grid():
    # s = 0.1, 4-bit codes (0..15): a score 210 units below the max has e = 279 against 279 * 2^30:
    # n = 2^30 + 1 (rounded) -> code 30 > 15 -> the zero code 16
    got = fq.softmax_codes(torch.tensor([[210, 0]]), 0, 0.1, 4)
    assert got.tolist() == [[0, 16]]


def test_dyadic_multiplier_by_hand():
    a = torch.tensor([8.944272, 0.3, 200.0, 300.0, 0.0], dtype=torch.float64)
    m, n = fq.dyadic(a)
    # 8.944: floor(log2) = 3, N = 7 - 3 = 4, M = floor(143.1) = 143; 0.3: floor(log2) = -2, N = 9,
    # M = floor(153.6) = 153; 200: N = 0, M = 200; 300: N = clamp(-1, 0) = 0, M = min(300, 255) = 255;
    # 0: log2 = -inf, N = 31, M = 0
    assert m.tolist() == [143, 153, 200, 255, 0]
    assert n.tolist() == [4, 9, 0, 0, 31]


def _ln(codes, zp, alpha, base, gamma, beta, out_scale, lo=-5000, hi=5000):
    f64 = dict(dtype=torch.float64)
    return fq.layernorm_codes(torch.tensor([codes], **f64), zp, torch.tensor(alpha, **f64), base,
                              torch.tensor(gamma, **f64), torch.tensor(beta, **f64), out_scale, 0, lo, hi)


def test_layernorm_by_hand_with_ptf_factors():
    # codes - zp = [2, -2, 0, 4], alpha = [0, 0, 1, 0] -> x = [2, -2, 0, 4] (channel 2 doubled: 0), s1 = 0.1
    # sum = 4, C sum(x^2) - sum^2 = 96 - 16 = 80, std = 0.1 / 4 * sqrt(80) = 0.2236068, mean = 0.1
    # A = 0.1 / 0.2236068 / 0.05 = 8.944272 -> M = 143, N = 4; B = round(-0.4472136 / 0.05 * 16) = -143
    # y = round((143 x - 143) / 16) = round([8.94, -26.81, -8.94, 26.81]) = [9, -27, -9, 27]
    got = _ln([130, 126, 128, 132], 128, [0, 0, 1, 0], 0.1, [1.0] * 4, [0.0] * 4, 0.05)
    assert got.tolist() == [[9, -27, -9, 27]]


def test_layernorm_8bit_multiplier_truncates_and_saturates():
    # x = [50, -50], s1 = 0.1: mean 0, C sum(x^2) = 10000, std = 0.1 / 2 * 100 = 5; A = 0.02 / 0.0006
    # = 33.33 -> N = 2, M = 133; y = round(+-133 * 50 / 4) = round(+-1662.5) = +-1662 (half to even),
    # where the exact LayerNorm gives +-1666.7 -> +-1667
    assert _ln([50, -50], 0, [0, 0], 0.1, [1.0, 1.0], [0.0, 0.0], 0.0006).tolist() == [[1662, -1662]]
    # x = [1, -1]: std = 0.1, A = 3 / 0.01 = 300 -> M saturates at 255: +-255 where the exact value is +-300
    assert _ln([1, -1], 0, [0, 0], 0.1, [3.0, 3.0], [0.0, 0.0], 0.01).tolist() == [[255, -255]]
    # the output grid clamps (the consumer's quantizer does in the code)
    assert _ln([1, -1], 0, [0, 0], 0.1, [3.0, 3.0], [0.0, 0.0], 0.01, -128, 127).tolist() == [[127, -128]]


def test_layernorm_bias_and_output_zero_point():
    # x = [1, -1], std = 0.1, gamma = 1, s_out = 0.1: A = 10 -> N = 4, M = 160; beta = [0.05, -0.05]:
    # B = round([0.5, -0.5] * 16) = [8, -8]; y = round([(160 + 8) / 16, (-160 - 8) / 16]) = round(+-10.5)
    # = +-10 (half to even); + zp_out 7 -> [17, -3]
    f64 = dict(dtype=torch.float64)
    got = fq.layernorm_codes(torch.tensor([[1.0, -1.0]], **f64), 0, torch.zeros(2, **f64), 0.1,
                             torch.ones(2, **f64), torch.tensor([0.05, -0.05], **f64), 0.1, 7, -128, 127)
    assert got.tolist() == [[17, -3]]


def test_quant_fqvit_runs_the_codes_arithmetic_by_default():
    """`quant=fqvit` switches norm1, norm2 and the softmax of every block, and the final LayerNorm, to FQ-ViT's
    arithmetic, as the code's model_quant does with PTF and LIS; the logits differ from the float-LayerNorm simulation and from the
    exact kernels, and a checkpoint keeps the arithmetic."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    q = vitq.quantize(model, vitq.recipe("fqvit"), inplace=False)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    vitq.calibrate(q, lambda m: m(x))
    kinds = {n: m.integer for n, m in q.named_modules() if isinstance(m, (QuantLayerNorm, QuantSoftmax))}
    assert kinds == {**{f"blocks.{i}.{k}": "fqvit" for i in range(2) for k in ("norm1", "norm2", "attn.softmax")},
                     "norm": "fqvit"}
    with torch.no_grad():
        out = {"fqvit": q(x)}
        for arithmetic in ("exact", None):
            vitq.set_integer(q, arithmetic is not None, arithmetic=arithmetic or "fqvit")
            out[arithmetic] = q(x)
    assert not torch.equal(out["fqvit"], out["exact"]) and not torch.equal(out["fqvit"], out[None])


def test_integer_option_values():
    with pytest.raises(ValueError, match="quant.integer='int8'.*fqvit.*exact.*false"):
        vitq.recipe("fqvit", integer="int8")
    with pytest.raises(ValueError, match="integer-ready"):  # true is exact: needs PTF and LIS
        vitq.recipe("fqvit", integer=True, lis=False)
    vitq.recipe("fqvit", integer="fqvit", lis=False)  # the code: integer LayerNorm with PTF alone
    assert math.isfinite(fq.exp_constants(1.5)[0])  # any score step: floor(-0.46) = -1
