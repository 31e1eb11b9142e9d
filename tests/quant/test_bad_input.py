"""Input the library must refuse (or show) instead of silently producing a wrong model."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import vitq
from vitq import float_layers
from vitq.quant import CalibrationError, PointSpec, Recipe, iter_points, save_quantized
from vitq.report.table import float_layers_line, print_points

pytestmark = pytest.mark.usefixtures("one_thread")

W8A8 = {"scope": "matmul", "weight": {"bits": 8, "per_channel": True, "symmetric": True},
        "activation": {"bits": 8}}


def _vit(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                             num_classes=10).eval()


def _batches(n: int = 3, bad: int | None = None, value: float = float("nan")) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(n)]
    if bad is not None:
        out[bad][1, 0, 5, 7] = value
    return out


def _loop(batches):
    def forward_loop(model):
        for x in batches:
            model(x)
    return forward_loop


@pytest.mark.parametrize("recipe", ["minmax", "ema", "percentile", "omse", "fqvit", "repq"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_calibration_data_names_the_first_point_and_the_batch(recipe, value):
    q = vitq.quantize(_vit(), recipe)
    with pytest.raises(CalibrationError, match=r"quant point patch_embed\.proj\.input: calibration batch 2 "):
        vitq.calibrate(q, _loop(_batches(bad=2, value=value)))
    assert all(p.mode == "off" for _, p in iter_points(q))  # nothing half-calibrated is left in use


def test_non_finite_data_after_the_first_quantized_point_names_the_point_that_saw_it():
    model = _vit()
    q = vitq.quantize(model, W8A8)  # matmul scope: the image input is not a quant point here ...
    q.patch_embed.proj.input_quantizer.configure(None)  # ... and neither is the patch embedding's input
    with pytest.raises(CalibrationError, match=r"quant point blocks\.0\.attn\.qkv\.input: calibration batch 1 "):
        vitq.calibrate(q, _loop(_batches(bad=1)))


def test_non_finite_weight_is_named():
    model = _vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[3, 4] = float("nan")
    q = vitq.quantize(model, W8A8)
    with pytest.raises(CalibrationError, match=r"quant point blocks\.1\.mlp\.fc2\.weight: its weight holds NaN"):
        vitq.calibrate(q, _loop(_batches()))


def test_statistics_that_overflow_to_a_non_finite_scale_are_refused():
    from vitq.quant import QuantPoint

    point = QuantPoint("linear_input")
    point.configure(PointSpec(bits=8))
    point.path = "blocks.0.mlp.fc1.input"
    point.set_mode("observe")
    point(torch.tensor([[-3e38, 3e38]]))  # finite values whose range (max - min) overflows float32
    with pytest.raises(CalibrationError, match=r"quant point blocks\.0\.mlp\.fc1\.input: calibration gave non-finite "
                                               r"scale"):
        point.freeze()


def test_loading_a_checkpoint_with_non_finite_parameters_fails(tmp_path):
    q = vitq.quantize(_vit(), W8A8)
    vitq.calibrate(q, _loop(_batches()))
    with torch.no_grad():
        q.blocks[0].attn.proj.input_quantizer.quantizer.scale.fill_(float("nan"))
    path = save_quantized(q, tmp_path / "q.ckpt")
    with pytest.raises(ValueError, match=r"q\.ckpt holds non-finite values .* blocks\.0\.attn\.proj\.input_quantizer"):
        vitq.load_quantized(_vit(), path)


def test_quantize_refuses_a_calibrated_model_and_says_how_to_requantize():
    q = vitq.quantize(_vit(), W8A8)
    vitq.calibrate(q, _loop(_batches()))
    scales = {n: p.quantizer.scale.clone() for n, p in iter_points(q) if p.configured}
    with pytest.raises(ValueError, match=r"already quantized and calibrated .*copy\.deepcopy\(float_model\)"):
        vitq.quantize(q, "minmax")
    assert all(torch.equal(p.quantizer.scale, scales[n]) for n, p in iter_points(q) if p.configured)
    assert all(p.mode == "quant" for n, p in iter_points(q) if p.configured)
    vitq.calibrate(q, _loop(_batches()))  # recalibrating with the same recipe is the deliberate route
    again = vitq.quantize(copy.deepcopy(_vit()), "minmax")  # and a fresh float copy quantizes as usual
    assert again.vitq.calibrated is False


@pytest.mark.parametrize("key", ["symmetric", "per_channel", "learnable", "enable", "signed"])
def test_boolean_fields_refuse_strings(key):
    with pytest.raises(ValueError, match=rf"quant\.weight: {key} must be true or false, got 'nope'"):
        Recipe.from_config({**W8A8, "weight": {**W8A8["weight"], key: "nope"}})
    with pytest.raises(ValueError, match=rf"{key} must be true or false"):
        PointSpec(**{key: 1})


def test_unknown_recipe_section_is_refused_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) 'weights' \(did you mean 'weight'\?\)"):
        Recipe.from_config({**W8A8, "weights": {"bits": 4}})
    with pytest.raises(ValueError, match=r"'w_bit' \(did you mean 'w_bits'\?\)"):
        Recipe.from_config({**W8A8, "w_bit": 4})


def test_axis_out_of_range_is_refused_at_the_first_batch():
    recipe = {**W8A8, "activation": {"bits": 8, "per_channel": True, "axis": 7}}
    q = vitq.quantize(_vit(), recipe)
    with pytest.raises(ValueError, match=r"quant point patch_embed\.proj\.input: axis=7 is out of range for its 4-d "
                                         r"tensor \[2, 3, 32, 32\]; use an axis in \[-4, 3\]"):
        vitq.calibrate(q, _loop(_batches()))
    with pytest.raises(ValueError, match=r"axis must be an integer, got 'last'"):
        PointSpec(axis="last")


def test_override_on_out_of_scope_points_without_enable_is_refused():
    recipe = Recipe.from_config({**W8A8, "overrides": [{"pattern": "*norm1.input", "bits": 4}]})
    with pytest.raises(ValueError, match=r"'\*norm1\.input' matches only points outside scope=matmul \(kinds "
                                         r"norm_input\), so it changes nothing: add enable: true"):
        vitq.quantize(_vit(), recipe)
    enabled = Recipe.from_config({**W8A8, "overrides": [{"pattern": "*norm1.input", "bits": 4, "enable": True}]})
    q = vitq.quantize(_vit(), enabled)
    points = dict(iter_points(q))
    assert points["blocks.0.norm1.input"].configured and points["blocks.0.norm1.input"].spec.bits == 4
    assert not points["blocks.0.norm2.input"].configured


def test_an_override_in_scope_after_an_enabling_one_counts():
    recipe = Recipe.from_config({**W8A8, "overrides": [{"pattern": "blocks.0.norm1.input", "enable": True, "bits": 8},
                                                       {"pattern": "*.norm1.input", "bits": 6}]})
    q = vitq.quantize(_vit(), recipe)  # the second applies to the point the first brought in
    assert dict(iter_points(q))["blocks.0.norm1.input"].spec.bits == 6


def test_hybrid_vit_stem_that_stays_float_is_named_in_the_summary():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64, num_classes=10).eval()
    q = vitq.quantize(model, "minmax")
    layers = float_layers(q)
    assert layers == [("patch_embed.backbone.conv", "StdConv2dSame")]
    assert float_layers(vitq.quantize(_vit(), "minmax")) == []
    from rich.console import Console
    console = Console(record=True, width=400)
    print_points(vitq.summary(q), console=console, float_layers=layers)
    text = console.export_text()
    assert "1 weighted layer(s) stay float under every recipe (no adapter covers them): " \
           "patch_embed.backbone.conv (StdConv2dSame)" in text
    assert float_layers_line([]) is None


def test_attn_bits_out_of_range_names_its_shorthand():
    recipe = vitq.recipe("minmax")
    cfg = recipe.to_config()
    cfg["softmax_output"] = {**cfg["softmax_output"], "bits": 0}
    with pytest.raises(ValueError, match=r"quant\.softmax_output\.bits=0 is out of range: .* quant\.attn_bits=8"):
        Recipe.from_config(cfg)
    with pytest.raises(ValueError, match=r"quant\.attn_bits=8"):
        vitq.recipe("minmax", attn_bits=0)
    with pytest.raises(ValueError, match=r"quant\.w_bits=8"):
        vitq.recipe("minmax", w_bits=1)
