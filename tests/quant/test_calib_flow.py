"""The calibration data flow (`calib_flow`): with `quantized`, every point's grid is what it would fit on
the inputs it receives in the finished quantized model, the codes' one forward with quantization on."""
from __future__ import annotations


import pytest
import timm
import torch

import vitq
from vitq.quant import Kind, QuantPoint

W8A8 = {"scope": "matmul", "weight": {"bits": 8, "per_channel": True, "symmetric": True},
        "activation": {"bits": 8, "observer": "minmax"}}


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          num_classes=10).eval()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    return m


def _inputs_in(model: torch.nn.Module, x: torch.Tensor, weights_off: bool = False) -> dict[str, torch.Tensor]:
    """What each activation point receives when `model` runs quantized (weights float if asked)."""
    seen, hooks = {}, []
    for name, p in vitq.iter_points(model):
        if p.configured and p.kind != Kind.WEIGHT:
            hooks.append(p.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].clone())))
    if weights_off:
        for _, p in vitq.iter_points(model):
            if p.kind == Kind.WEIGHT:
                p.set_mode("off")
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        vitq.set_mode(model, "quant")
    return seen


def _minmax_scale(x: torch.Tensor, bits: int = 8) -> float:
    """The asymmetric MinMax step by its definition: the range widened to hold 0, over 2^b - 1 levels."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    return (hi - lo) / (2**bits - 1)


@pytest.mark.parametrize("flow", ["quantized", "quantized_activations", "float"])
def test_each_grid_fits_what_the_point_receives_in_the_flow(flow):
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = vitq.quantize(_vit(), vitq.Recipe.from_config({**W8A8, "calib_flow": flow}))
    vitq.calibrate(q, lambda m: m(x))  # one batch: the codes' single calibration forward
    if flow == "float":
        fp = _vit()
        vitq.quantize(fp, vitq.Recipe.from_config(W8A8))
        vitq.set_mode(fp, "off")
        received = _inputs_in(fp, x)  # the float model's activations
    else:
        received = _inputs_in(q, x, weights_off=flow == "quantized_activations")
    points = dict(vitq.iter_points(q))
    assert len(received) > 10
    for name, inp in received.items():
        scale = float(points[name].quantizer.scale)
        assert scale == pytest.approx(_minmax_scale(inp), rel=1e-5), name
    # and the flows differ: downstream of the first quantized point, the grids are not the float ones
    if flow != "float":
        fp_q = vitq.quantize(_vit(), vitq.Recipe.from_config(W8A8))
        vitq.calibrate(fp_q, lambda m: m(x))
        differ = [n for n, p in vitq.iter_points(fp_q) if p.configured and p.kind != Kind.WEIGHT
                  and not torch.equal(p.quantizer.scale, points[n].quantizer.scale)]
        assert len(differ) > 5


def test_flow_is_a_recipe_field_that_round_trips_and_refuses_typos():
    r = vitq.Recipe.from_config({**W8A8, "calib_flow": "quantized"})
    assert vitq.Recipe.from_config(r.to_config()).calib_flow == "quantized"
    assert vitq.Recipe.from_config(W8A8).calib_flow == "float"
    with pytest.raises(ValueError, match="unknown calib_flow 'quantised': choose one of float, quantized"):
        vitq.Recipe.from_config({**W8A8, "calib_flow": "quantised"})
    assert {n: vitq.recipe(n).calib_flow for n in ("repq", "isvit", "noisyquant", "fqvit", "qdrop", "minmax")} == {
        "repq": "quantized", "isvit": "quantized_activations", "noisyquant": "quantized", "fqvit": "float",
        "qdrop": "float", "minmax": "float"}
    with pytest.raises(ValueError, match="mode must be one of off, observe, calibrate, quant"):
        QuantPoint(Kind.LINEAR_INPUT).set_mode("on")
