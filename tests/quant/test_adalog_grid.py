"""AdaLog's adaptive-base log grid against levels worked by hand from the code's definitions
(GoatWu/AdaLog `quantizers/logarithm.py`: r = 37, k = round(-log2(x/s) r/q), the dequantized level
s 2^-floor(kq/r) round(2^(-((kq) mod r)/r) D)/D with D = 2^(b+1) - 2, codes reaching 2^b -> 0)."""
from __future__ import annotations

import pytest
import torch

import vitq
from vitq.quant.log_grids import AdaLogQuantizer, Log2Quantizer


def _grid(bits: int, q: int, scale: float = 1.0) -> AdaLogQuantizer:
    g = AdaLogQuantizer(bits)
    g.set_base(q)
    g.set_range(torch.tensor(0.0), torch.tensor(scale))
    return g


def test_levels_by_hand_at_4_bits_and_q_30():
    # D = 30. x = 0.3: -log2 0.3 = 1.7370, x 37/30 = 2.142 -> k = 2; kq = 60 = 1*37 + 23,
    # 2^(-23/37) 30 = 19.49 -> 19: 2^-1 19/30 = 0.316667. x = 0.5: 1.233 -> 1; 30 = 0*37 + 30, 17.1 -> 17: 17/30.
    # x = 0.1: 3.3219 x 1.2333 = 4.097 -> 4; 120 = 3*37 + 9, 2^(-9/37) 30 = 25.34 -> 25: 25/240 = 0.104167.
    # x = 0.01: 8.194 -> 8; 240 = 6*37 + 18, 21.41 -> 21: 21/1920. x = 1e-4: 16.39 -> 16 >= 16: zero.
    g = _grid(4, 30)
    x = torch.tensor([0.3, 0.5, 0.1, 0.01, 1e-4, 1.0, 2.0])
    assert g.to_codes(x).tolist() == [2, 1, 4, 8, 16, 0, 0]
    want = torch.tensor([19 / 60, 17 / 30, 25 / 240, 21 / 1920, 0.0, 1.0, 1.0])
    torch.testing.assert_close(g(x), want, rtol=1e-6, atol=0)


def test_all_sixteen_levels_match_the_worked_table():
    g = _grid(4, 30)
    levels = g.from_codes(torch.arange(16.0))
    hand = [1, .5667, .3167, .1833, .1042, .0604, .0333, .0198, .0109, .00625, .00365, .00208, .00117, .00068,
            .00039, .00022]
    torch.testing.assert_close(levels, torch.tensor(hand), rtol=0.02, atol=0)
    assert float(g.from_codes(torch.tensor(16.0))) == 0.0


def test_q_37_is_the_plain_log2_grid_with_a_scale():
    # q = r: the table is all ones, so level k is s 2^-k; 3 bits, x = 0.3: round(1.737) = 2 -> 0.25
    g = _grid(3, 37, scale=2.0)
    assert float(g(torch.tensor(0.6))) == 0.5  # 0.6 / 2 = 0.3 -> 2^-2, times 2
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    k = g.to_codes(x)
    torch.testing.assert_close(g.from_codes(k), torch.where(k > 7, 0.0, 2.0 * torch.exp2(-k)))
    assert Log2Quantizer(3).qmax == g.qmax


def test_zero_and_negative_inputs_take_the_codes_clamped_value_and_gradients_pass_straight_through():
    g = _grid(4, 30)
    assert g.to_codes(torch.tensor([0.0, -1.0])).tolist() == [16, 16]  # 1e-15: round(49.83 x 37/30) = 61
    big = _grid(6, 137)  # 6 bits, q = 137: 1e-15 gives code round(49.83 x 37/137) = 13, a tiny level
    assert big.to_codes(torch.tensor([0.0])).tolist() == [13]
    x = torch.tensor([0.3, 0.02], requires_grad=True)
    g(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]


def test_recipe_places_it_at_the_attention_probabilities_and_it_reloads(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_classes=10).eval()
    recipe = vitq.recipe("minmax", softmax_output={"quantizer": "adalog", "bits": 4, "observer": None})
    q = vitq.quantize(model, recipe)
    grid = q.blocks[0].attn.softmax.output_quantizer.quantizer
    assert isinstance(grid, AdaLogQuantizer)
    x = torch.randn(2, 3, 32, 32)
    vitq.calibrate(q, lambda m: m(x))
    grid.set_base(29)
    with pytest.raises(ValueError, match="positive integer"):
        grid.set_base(2.5)
    vitq.save_quantized(q, tmp_path / "q.pt")
    again = vitq.load_quantized(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                                  patch_size=8, depth=1, num_classes=10).eval(), tmp_path / "q.pt")
    assert int(again.blocks[0].attn.softmax.output_quantizer.quantizer.q) == 29
    with torch.no_grad():
        assert torch.equal(again(x), q(x))


@pytest.mark.parametrize("name", ["adalog", "log_sqrt2"])
def test_the_per_tensor_log_grids_refuse_a_per_channel_spec(name):
    from types import SimpleNamespace

    from vitq.quant.quantizers import get_grid

    with pytest.raises(ValueError, match=f"the {name} quantizer is per tensor: set per_channel: false"):
        get_grid(name).from_spec(SimpleNamespace(bits=4), -1, -1)
    assert get_grid(name).from_spec(SimpleNamespace(bits=4), None, -1).bits == 4
