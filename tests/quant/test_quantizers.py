"""UniformQuantizer arithmetic, checked against hand-computed grids and values."""
from __future__ import annotations

import pytest
import torch

from vitq.quant import PointSpec, UniformQuantizer

TOL = 1e-6  # float32 slack on top of the exact bound


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _q(bits=8, symmetric=False, signed=None, axis=None, learnable=False, lo=None, hi=None):
    q = UniformQuantizer(bits, symmetric=symmetric, signed=signed, axis=axis, learnable=learnable)
    if lo is not None:
        q.set_range(torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32))
    return q


# ---------------------------------------------------------------------------------------------------
# grids: qmin / qmax / scale / zero point by hand
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "bits, symmetric, signed, qmin, qmax",
    [
        (4, False, None, 0, 15),  # asymmetric defaults to an unsigned grid
        (4, False, True, -8, 7),
        (4, True, None, -8, 7),  # symmetric defaults to a signed grid
        (4, True, False, 0, 15),
        (8, False, None, 0, 255),
        (8, True, None, -128, 127),
        (8, True, False, 0, 255),
        (2, True, None, -2, 1),
        (16, True, None, -32768, 32767),
        (16, False, None, 0, 65535),
    ],
)
def test_grid_bounds(bits, symmetric, signed, qmin, qmax):
    q = UniformQuantizer(bits, symmetric=symmetric, signed=signed)
    assert (q.qmin, q.qmax) == (qmin, qmax)
    assert q.signed == (symmetric if signed is None else signed)


def test_asymmetric_unsigned_4bit_params():
    # [-1, 2] on 0..15: scale = 3 / 15 = 0.2, zero point = 0 - round(-1 / 0.2) = 5
    q = _q(4, lo=-1.0, hi=2.0)
    assert q.scale.item() == pytest.approx(0.2, abs=1e-7)
    assert q.zero_point.item() == 5
    # grid ends are exactly the range ends: (0 - 5) * 0.2 = -1, (15 - 5) * 0.2 = 2
    out = q(torch.tensor([-1.0, 2.0, 0.0, 0.29, 0.31, 1.05]))
    torch.testing.assert_close(out, torch.tensor([-1.0, 2.0, 0.0, 0.2, 0.4, 1.0]), atol=1e-6, rtol=0)


def test_asymmetric_signed_4bit_params():
    # [-1, 2] on -8..7: scale = 0.2, zero point = -8 - round(-5) = -3
    q = _q(4, symmetric=False, signed=True, lo=-1.0, hi=2.0)
    assert q.scale.item() == pytest.approx(0.2, abs=1e-7)
    assert q.zero_point.item() == -3
    assert q.to_codes(torch.tensor([-1.0, 0.0, 2.0])).tolist() == [-8.0, -3.0, 7.0]


def test_asymmetric_8bit_params():
    # [-0.5, 1.0] on 0..255: scale = 1.5 / 255, zero point = -round(-0.5 * 255 / 1.5) = 85
    q = _q(8, lo=-0.5, hi=1.0)
    assert q.scale.item() == pytest.approx(1.5 / 255, rel=1e-6)
    assert q.zero_point.item() == 85
    assert q.to_codes(torch.tensor([-0.5, 0.0, 1.0])).tolist() == [0.0, 85.0, 255.0]


def test_symmetric_signed_params():
    # 4 bits: max(|-1|, 0.5) / 7; 8 bits: max(|-2|, 1) / 127; zero point always 0
    q4 = _q(4, symmetric=True, lo=-1.0, hi=0.5)
    assert q4.scale.item() == pytest.approx(1 / 7, rel=1e-6)
    assert q4.zero_point.item() == 0
    q8 = _q(8, symmetric=True, lo=-2.0, hi=1.0)
    assert q8.scale.item() == pytest.approx(2 / 127, rel=1e-6)
    assert q8.zero_point.item() == 0
    # the grid is [-128, 127] * 2/127: -2 is code -127, the most negative code is one step further
    assert q8.to_codes(torch.tensor([-2.0, 1.0, -3.0])).tolist() == [-127.0, 64.0, -128.0]


def test_symmetric_unsigned_params_clamp_negatives():
    # softmax-style grid: scale = hi / 255, zero point 0, negatives clamp to 0
    q = _q(8, symmetric=True, signed=False, lo=0.0, hi=1.0)
    assert q.scale.item() == pytest.approx(1 / 255, rel=1e-6)
    assert q.zero_point.item() == 0
    # 0.201 * 255 = 51.26 -> code 51
    out = q(torch.tensor([-0.3, 0.0, 0.201, 1.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 51 / 255, 1.0]), atol=1e-6, rtol=0)


def test_range_is_extended_to_contain_zero():
    # [1, 3] becomes [0, 3] so that 0 is exactly representable
    q = _q(8, lo=1.0, hi=3.0)
    assert q.zero_point.item() == 0
    assert q.scale.item() == pytest.approx(3 / 255, rel=1e-6)
    assert q(torch.tensor([0.0])).item() == 0.0
    # and [-3, -1] becomes [-3, 0]
    q = _q(8, lo=-3.0, hi=-1.0)
    assert q.scale.item() == pytest.approx(3 / 255, rel=1e-6)
    assert q.zero_point.item() == 255
    assert q(torch.tensor([0.0])).item() == 0.0


def test_degenerate_range_has_positive_scale():
    # [0, 0] would give scale 0 (a division by zero in the codes): the scale is floored at 1e-8 and
    # the grid is [0, 255e-8]; zeros stay exact, everything else clamps to the grid ends, nothing is NaN
    q = _q(8, lo=0.0, hi=0.0)
    assert q.scale.item() == pytest.approx(1e-8, rel=1e-6)
    assert q.zero_point.item() == 0
    assert torch.equal(q(torch.zeros(4)), torch.zeros(4))
    out = q(torch.tensor([1.0, -1.0, 1e-8]))
    torch.testing.assert_close(out, torch.tensor([255e-8, 0.0, 1e-8]), atol=1e-12, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# error bound inside the range, clamping outside
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "symmetric, signed, lo, hi",
    [(False, None, -1.3, 2.7), (False, True, -0.2, 5.0), (True, None, -3.0, 1.1), (True, False, 0.0, 0.9)],
)
def test_error_at_most_half_step_inside_range(bits, symmetric, signed, lo, hi):
    q = _q(bits, symmetric=symmetric, signed=signed, lo=lo, hi=hi)
    scale = q.scale.item()
    x = torch.cat([torch.linspace(lo, hi, 10001), lo + (hi - lo) * torch.rand(10000)])
    err = (q(x) - x).abs().max().item()
    assert err <= scale / 2 + TOL
    # the bound is tight: some value sits (almost) exactly between two grid points
    assert err >= 0.45 * scale


@pytest.mark.parametrize(
    "bits, symmetric, signed, lo, hi",
    [(4, False, None, -1.0, 2.0), (8, False, None, -0.5, 1.0), (4, True, None, -1.0, 0.5), (8, True, False, 0.0, 1.0)],
)
def test_values_outside_range_clamp_to_grid_ends(bits, symmetric, signed, lo, hi):
    q = _q(bits, symmetric=symmetric, signed=signed, lo=lo, hi=hi)
    s, zp = q.scale.item(), q.zero_point.item()
    top, bottom = (q.qmax - zp) * s, (q.qmin - zp) * s
    out = q(torch.tensor([hi + 10.0, hi + 1e3, lo - 10.0, lo - 1e3]))
    torch.testing.assert_close(out, torch.tensor([top, top, bottom, bottom]), atol=1e-6, rtol=1e-6)
    assert q.to_codes(torch.tensor([1e6, -1e6])).tolist() == [q.qmax, q.qmin]


# ---------------------------------------------------------------------------------------------------
# per channel
# ---------------------------------------------------------------------------------------------------

def test_per_channel_axis0_weight():
    lo = torch.tensor([-1.0, -2.0, -0.5])
    hi = torch.tensor([2.0, 1.0, 0.25])
    q = _q(4, axis=0, lo=lo, hi=hi)
    # channel c: scale = (hi - lo) / 15, zero point = -round(lo / scale)
    torch.testing.assert_close(q.scale, torch.tensor([0.2, 0.2, 0.05]), atol=1e-7, rtol=0)
    assert q.zero_point.tolist() == [5.0, 10.0, 10.0]

    w = torch.tensor([[0.33, -1.0, 2.5, 0.05, -0.7],
                      [0.33, -1.0, 2.5, 0.05, -0.7],
                      [0.33, -1.0, 2.5, 0.05, -0.07]])
    out = q(w)
    # channel 1 by hand, scale 0.2, zero point 10, codes clamp to [0, 15] i.e. values to [-2, 1]:
    #   0.33 -> round(1.65)=2 -> 0.4 ; -1 -> -5 -> -1.0 ; 2.5 -> 12.5 -> clamp 5 -> 1.0 ;
    #   0.05 -> round(0.25)=0 -> 0.0 ; -0.7 -> round(-3.5)=-4 (half to even) -> -0.8
    torch.testing.assert_close(out[1], torch.tensor([0.4, -1.0, 1.0, 0.0, -0.8]), atol=1e-6, rtol=0)
    # channel 2 by hand, scale 0.05, zero point 10, values limited to [-0.5, 0.25]:
    #   0.33 -> 0.25 ; -1 -> -0.5 ; 2.5 -> 0.25 ; 0.05 -> 0.05 ; -0.07 -> round(-1.4)=-1 -> -0.05
    torch.testing.assert_close(out[2], torch.tensor([0.25, -0.5, 0.25, 0.05, -0.05]), atol=1e-6, rtol=0)
    # and channel 0 differs from channel 1 although the inputs are the same: own scale per row
    torch.testing.assert_close(out[0], torch.tensor([0.4, -1.0, 2.0, 0.0, -0.8]), atol=1e-6, rtol=0)


def test_per_channel_last_axis_activation():
    x = torch.randn(2, 5, 3) * torch.tensor([0.1, 1.0, 10.0])
    lo, hi = x.amin(dim=(0, 1)), x.amax(dim=(0, 1))
    q = _q(8, axis=-1, lo=lo, hi=hi)
    assert q.scale.shape == (3,)
    out = q(x)
    for c in range(3):
        ref = _q(8, lo=lo[c], hi=hi[c])
        assert torch.equal(out[..., c], ref(x[..., c]))
        assert (out[..., c] - x[..., c]).abs().max() <= q.scale[c] / 2 + TOL
    # scales follow each channel's range, not the tensor's
    torch.testing.assert_close(q.scale, (hi - torch.minimum(lo, torch.zeros(3))) / 255)


def test_per_channel_state_dict_loads_into_fresh_quantizer():
    q = _q(4, symmetric=True, axis=0, lo=-torch.tensor([1.0, 2.0, 3.0]), hi=torch.tensor([1.0, 2.0, 3.0]))
    fresh = UniformQuantizer(4, symmetric=True, axis=0)
    assert fresh.scale.shape == (1,)
    fresh.load_state_dict(q.state_dict())
    w = torch.randn(3, 7) * 3
    assert torch.equal(fresh(w), q(w))


# ---------------------------------------------------------------------------------------------------
# bits validation
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 17, 0, -8, 2.5, 8.0, True])
def test_invalid_bits_raise(bits):
    with pytest.raises(ValueError, match=r"between 2 and 16"):
        UniformQuantizer(bits)


@pytest.mark.parametrize("bits", [1, 17, 2.5])
def test_invalid_bits_raise_in_point_spec(bits):
    with pytest.raises(ValueError, match=r"between 2 and 16"):
        PointSpec(bits=bits)


@pytest.mark.parametrize("bits", [2, 16])
def test_extreme_valid_bits_work(bits):
    q = _q(bits, lo=-1.0, hi=1.0)
    x = torch.linspace(-1, 1, 1001)
    assert (q(x) - x).abs().max() <= q.scale.item() / 2 + TOL
    assert q.scale.item() == pytest.approx(2 / (2**bits - 1), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [None, 0])
def test_straight_through_gradient(axis):
    lo, hi = (-1.0, 2.0) if axis is None else (torch.tensor([-1.0, -1.0]), torch.tensor([2.0, 2.0]))
    q = _q(4, axis=axis, lo=lo, hi=hi)
    x = torch.tensor([[-3.0, -1.0, -0.5, 0.0, 0.7, 1.93, 2.0, 5.0]] * 2, requires_grad=True)
    q(x).sum().backward()
    expected = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]] * 2)
    assert torch.equal(x.grad, expected)


def test_learnable_scale_gets_lsq_gradient():
    q = _q(4, learnable=True, lo=-1.0, hi=2.0)
    assert isinstance(q.scale, torch.nn.Parameter)
    x = torch.randn(1000)
    x.requires_grad_(True)
    y = q(x)
    # same values as the non-learnable quantizer with the same parameters
    ref = _q(4, lo=-1.0, hi=2.0)
    torch.testing.assert_close(y.detach(), ref(x.detach()), atol=1e-6, rtol=0)
    (y - x.detach()).pow(2).sum().backward()
    # LSQ by hand (scale 0.2, zero point 5, codes 0..15): d q / d s = (code - zp) - x / s inside the
    # grid and (clamped code - zp) outside it, times the gradient scale 1 / sqrt(N * qmax)
    assert q.scale.grad.item() == pytest.approx(_lsq_scale_grad(x.detach(), 0.2, 5.0, 0, 15), rel=1e-4)


def _lsq_scale_grad(x, s, zp, qmin, qmax):
    """d/ds of sum((q(x) - x)^2) under LSQ, written out (float64)."""
    x = x.double()
    v = x / s + zp
    code = torch.round(v)
    inside = (code >= qmin) & (code <= qmax)
    code = code.clamp(qmin, qmax)
    q = (code - zp) * s
    dq_ds = torch.where(inside, (code - zp) - x / s, code - zp)
    return (2 * (q - x) * dq_ds).sum().item() / (x.numel() * qmax) ** 0.5


def test_learnable_input_gradient_is_straight_through_between_grid_ends():
    q = _q(4, learnable=True, lo=-1.0, hi=2.0)  # codes 0..15, scale 0.2, zero point 5
    # none of the in-range values below rounds to code 0 or code 15
    x = torch.tensor([-3.0, -0.5, 0.0, 0.7, 1.7, 5.0], requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_learnable_input_gradient_is_one_on_grid_end_codes():
    q = _q(4, learnable=True, lo=-1.0, hi=2.0)
    x = torch.tensor([-1.0, -0.95, 1.95, 2.0], requires_grad=True)  # codes 0, 0, 15, 15: all inside the range
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_learnable_per_channel_scale_gradient_per_channel():
    q = _q(4, learnable=True, axis=0, lo=torch.tensor([-1.0, -1.0]), hi=torch.tensor([1.0, 1.0]))
    x = torch.randn(2, 64)
    x[1] = 0.0  # zeros are exact on the grid: channel 1 gets no gradient
    (q(x) - x).pow(2).sum().backward()
    assert q.scale.grad.shape == (2,)
    # channel 0 gets its own LSQ gradient: scale 2/15, zero point 7 (in float32 -1 / (2/15) is
    # -7.4999995, which rounds to -7), N = 64 values per channel
    assert q.zero_point.tolist() == [7.0, 7.0]
    assert q.scale.grad[0].item() == pytest.approx(_lsq_scale_grad(x[0], 2 / 15, 7.0, 0, 15), rel=1e-4)
    assert q.scale.grad[1] == 0


# ---------------------------------------------------------------------------------------------------
# integer codes
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, lo, hi, shape",
    [
        (dict(bits=8), -1.3, 2.7, (4, 50)),
        (dict(bits=4, symmetric=True), -2.0, 1.0, (4, 50)),
        (dict(bits=6, axis=0), torch.tensor([-1.0, -2.0, -0.1, 0.0]), torch.tensor([1.0, 3.0, 0.1, 4.0]), (4, 50)),
        (dict(bits=5, symmetric=True, axis=-1), -torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]),
         (2, 6, 3)),
    ],
)
def test_codes_agree_with_forward(kwargs, lo, hi, shape):
    q = _q(lo=lo, hi=hi, **kwargs)
    x = torch.randn(*shape) * 2
    codes = q.to_codes(x)
    assert torch.equal(codes, codes.round())
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert torch.equal(q.from_codes(codes), q(x))


def test_codes_by_hand():
    q = _q(4, lo=-1.0, hi=2.0)  # scale 0.2, zero point 5
    codes = q.to_codes(torch.tensor([-1.0, -0.2, 0.0, 0.5, 2.0, 9.0]))
    # 0.5 / 0.2 = 2.5 -> 2 (half to even) -> 7
    assert codes.tolist() == [0.0, 4.0, 5.0, 7.0, 15.0, 15.0]
    torch.testing.assert_close(q.from_codes(torch.tensor([0.0, 5.0, 15.0])), torch.tensor([-1.0, 0.0, 2.0]))


def test_half_precision_input_keeps_dtype():
    q = _q(4, lo=-1.0, hi=2.0)  # scale 0.2, zero point 5
    # bf16 inputs (all exact in bf16); by hand on the float32 grid:
    #   0.5 / 0.2 = 2.5 -> 2 (half to even) -> 0.4 ; -0.6015625 -> -3.008 -> -3 -> -0.6 ;
    #   0.3515625 -> 1.758 -> 2 -> 0.4 ; 3.0 -> clamp to code 15 -> 2.0 ; -1.5 -> code 0 -> -1.0
    x = torch.tensor([0.5, -0.6015625, 0.3515625, 3.0, -1.5], dtype=torch.bfloat16)
    out = q(x)
    assert out.dtype == torch.bfloat16
    want = torch.tensor([0.4, -0.6, 0.4, 2.0, -1.0]).to(torch.bfloat16)  # the grid values, rounded to bf16
    assert torch.equal(out, want)


def test_extra_repr_names_grid():
    assert "bits=4, signed, symmetric, per-channel(axis=0)" in repr(UniformQuantizer(4, True, axis=0))
    assert "unsigned, asymmetric, per-tensor" in repr(UniformQuantizer(8))


def test_range_away_from_zero_kept_as_calibrated_by_hand():
    """RepQ-ViT's quantizer: step = (max - min) / (2^b - 1), zero point round(-min / step), neither widened
    to hold 0 nor clamped. [5, 10] at 8 bits: step 5/255, zero point -255; 7.35 / step = 374.85 -> code
    375 - 255 = 120 -> 375 * 5/255 = 7.352941. The widened grid [0, 10] (step 10/255) gives 187 ->
    7.333333. Gradient as the fused kernels: 1 in range, 0 where clipped (12 lies above 10)."""
    kept = UniformQuantizer(8, symmetric=False, zero_in_range=False)
    kept.set_range(torch.tensor(5.0), torch.tensor(10.0))
    assert float(kept.scale) == pytest.approx(5 / 255) and float(kept.zero_point) == -255.0
    x = torch.tensor([7.35, 12.0], requires_grad=True)
    y = kept(x)
    assert y.tolist() == pytest.approx([375 * 5 / 255, 10.0], abs=1e-6)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]
    with torch.no_grad():  # the inference path computes the same
        assert kept(x.detach()).tolist() == pytest.approx(y.tolist(), abs=1e-6)
    widened = UniformQuantizer(8, symmetric=False)
    widened.set_range(torch.tensor(5.0), torch.tensor(10.0))
    assert float(widened.zero_point) == 0.0 and float(widened(torch.tensor(7.35))) == pytest.approx(187 * 10 / 255)
    assert UniformQuantizer(8, symmetric=True, zero_in_range=False).zero_in_range  # symmetric grids hold 0


def test_half_span_symmetric_step_by_hand():
    """FQ-ViT's symmetric observer divides max|x| by (qmax - qmin) / 2: 8 bits, max|x| = 1.275 -> step
    1.275 / 127.5 = 0.01 (codes -127 .. 127 in use); the default divides by qmax: 1.275 / 127 = 0.0100394."""
    x = torch.tensor([-1.275, 0.5])
    half = UniformQuantizer(8, symmetric=True, half_span=True)
    half.set_range(x.min(), x.max())
    assert float(half.scale) == pytest.approx(0.01, rel=1e-6)
    assert half.to_codes(x).tolist() == [-128, 50]  # round(-127.5) = -128 (half to even), 0.5 / 0.01 = 50
    plain = UniformQuantizer(8, symmetric=True)
    plain.set_range(x.min(), x.max())
    assert float(plain.scale) == pytest.approx(1.275 / 127, rel=1e-6)
    assert half.probe().half_span  # the clip searches score candidates on the same grid
