"""NoisyQuant's calibration flow against its code's, written out here from kriskrisliu/NoisyQuant's
fast_quant.py: weights quantized first; a first forward in which each nn.Linear (not the head), on the
input its already-searched predecessors give, searches its clip among absmax * ii / 1000 (ii = 1000 .. 1,
the input clamped to the clip, first minimum kept) against q(W) x + b; a second forward in which each layer,
with the noise of the layers before it in place, searches the amplitude ii / 1000 (ii < 2000) of its noise.

The reference runs the code's searches inside the forward on one batch, as the code does; vitq replays the
calibration data once per layer (`noisy_flow: sequential`). The noise draws are shared inputs (the code
draws `randn_like` unseeded): the reference takes vitq's seeded `base_noise` vectors."""
from __future__ import annotations

import copy
from types import MethodType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitq
from vitq.methods.noisyquant import NoisyGrid, base_noise, noisy_layers

from small_vit import model_and_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def code_quant_act(x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    n = 2 ** (bits - 1) - 1
    return (x / scale).round().clamp(-n - 1, n) * scale


def code_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    n = 2 ** (bits - 1) - 1
    s = w.abs().amax(dim=1, keepdim=True) / n
    return (w / s).round().clamp(-n - 1, n) * s


def code_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """fast_quant.py's quant_forward with percentile (clip) search and noisy-range search."""
    n = 2 ** (self.bit - 1) - 1
    if self.phase == "clip":
        z0 = F.linear(x, self.weight, self.bias)
        absmax, best = x.abs().max(), None
        for ii in range(1000, 0, -1):
            clip = absmax / 1000 * ii
            scale = clip / n
            loss = ((F.linear(code_quant_act(x.clamp(-clip, clip), self.bit, scale), self.weight, self.bias) - z0) ** 2).mean()
            if best is None or loss < best[0]:  # (the code leaves its step unset when ii = 1000 wins)
                best = (loss, scale)
        self.scale, self.phase = best[1], None
    elif self.phase == "noise":
        z = F.linear(x, self.weight, self.bias)
        loss_min, best = 1e6, None
        for ii in range(2000):
            c = self.u * self.scale * ii / 1000
            zq = F.linear(code_quant_act(x + c, self.bit, self.scale) - c, self.weight, self.bias)
            loss = F.mse_loss(zq, z)
            if loss < loss_min:
                loss_min, best = loss, c
        self.noise, self.phase = best, None
    x = code_quant_act(x + self.noise, self.bit, self.scale) - self.noise
    return F.linear(x, self.weight, self.bias)


def code_calibrated(model: nn.Module, bits: int, x: torch.Tensor) -> list[nn.Linear]:
    """The model with the code's layers, calibrated in its two forwards on the one batch `x`."""
    layers = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"]
    for index, m in enumerate(layers):
        m.weight.data = code_quant_weight(m.weight.data, bits)
        m.bit, m.noise, m.u = bits, 0.0, base_noise(m.in_features, 0, index)
        m.forward = MethodType(code_forward, m)
    with torch.no_grad():
        for phase in ("clip", "noise"):
            for m in layers:
                m.phase = phase
            model(x)
    return layers


@pytest.mark.parametrize("bits", [6, 4])
def test_sequential_searches_match_the_codes_two_forwards(bits):
    model, x = model_and_inputs(6)
    code_model = copy.deepcopy(model)
    reference = code_calibrated(code_model, bits, x)
    q = vitq.quantize(copy.deepcopy(model), vitq.recipe("noisyquant", w_bits=bits, a_bits=bits))
    vitq.calibrate(q, lambda m: m(x))
    ours = [layer for _, layer in noisy_layers(q)]
    assert len(ours) == len(reference) == 8
    for index, (layer, ref) in enumerate(zip(ours, reference)):
        grid = layer.input_quantizer.quantizer
        assert isinstance(grid, NoisyGrid), index
        torch.testing.assert_close(grid.scale.reshape(()), ref.scale.reshape(()), rtol=1e-6, atol=0,
                                   msg=f"layer {index}: clip step")
        torch.testing.assert_close(grid.noise, torch.as_tensor(ref.noise).expand_as(grid.noise).float(),
                                   rtol=1e-5, atol=1e-7, msg=f"layer {index}: noise")
    assert sum(bool(torch.as_tensor(r.noise).abs().max() > 0) for r in reference) >= 2  # the noise searches chose noise
    with torch.no_grad():
        torch.testing.assert_close(q(x), code_model(x), rtol=1e-4, atol=1e-4)


def test_sequential_flow_replays_every_batch_on_every_process():
    method = vitq.recipe("noisyquant").method_impl()
    assert method.calibrates_in_order()
    assert not vitq.recipe("noisyquant", noisy_flow="captured").method_impl().calibrates_in_order()
    with pytest.raises(ValueError, match="noisy_flow='sideways'"):
        vitq.recipe("noisyquant", noisy_flow="sideways")
