"""`model.vitq`: the one record vitq keeps on a quantized model (recipe, calibrated, float weights)."""
from __future__ import annotations

import pytest
import timm
import torch

import vitq
from vitq.quant import QuantState, keep_float_weights, quant_state, read_quantized, save_quantized

W8A8 = {"scope": "matmul", "weight": {"bits": 8, "per_channel": True}, "activation": {"bits": 8}}


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                             depth=2).eval()


def test_state_follows_the_model_through_quantize_calibrate_save_and_load(tmp_path):
    recipe = vitq.Recipe.from_config(W8A8)
    fp = _vit()
    q = vitq.quantize(_vit(), recipe)
    assert isinstance(q.vitq, QuantState) and q.vitq.recipe is not recipe  # the model's own copy
    assert (q.vitq.recipe.specs, q.vitq.calibrated, q.vitq.float_state) == (recipe.specs, False, None)
    vitq.calibrate(q, lambda m: m(torch.randn(4, 3, 32, 32)))
    assert q.vitq.calibrated is True
    assert "float_state_dict" not in read_quantized(save_quantized(q, tmp_path / "a.ckpt"))

    with torch.no_grad():  # a stage that changes weights keeps the float ones first, once
        fp.head.bias.fill_(0.25)
    assert keep_float_weights(q, fp) is True and keep_float_weights(q, _vit()) is False
    assert torch.equal(q.vitq.float_state["head.bias"], torch.full((10,), 0.25))
    back = vitq.load_quantized(_vit(), save_quantized(q, tmp_path / "b.ckpt"))
    assert back.vitq.calibrated is True and back.vitq.recipe.specs == recipe.specs
    assert torch.equal(back.vitq.float_state["head.bias"], torch.full((10,), 0.25))


def test_a_model_vitq_did_not_make_is_named_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"VisionTransformer was not made by vitq\.quantize .*call "
                                         r"vitq\.quantize\(model, recipe\) first"):
        quant_state(_vit())
    with pytest.raises(ValueError, match="not made by vitq.quantize"):
        vitq.calibrate(_vit(), lambda m: None)
    with pytest.raises(ValueError, match="not made by vitq.quantize"):
        save_quantized(_vit(), tmp_path / "never.ckpt")
    assert not (tmp_path / "never.ckpt").exists()
