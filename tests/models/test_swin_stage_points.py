"""Swin under `quant.stage_points` (on in `quant=fqvit`) places FQ-ViT's `swin_quant.py` quantizers at the
stage boundaries: the patch embedding's LayerNorm reads a plain uint8 grid (`qact_before_norm`) and writes
`patch_embed.qact`, the first block's input, read by its `norm1` without a PTF point; a PatchMerging's
reduction output (`downsample.qact2`) is the next stage's first input the same way; the final LayerNorm
writes `qact2` before the pooling, and `qact3` (the head's input) follows it. Each of those LayerNorms runs
the code's integer arithmetic (`QIntLayerNorm` mode 'int', whose channel mask is all ones on a per-tensor
grid) into the point after it. `quant.bias_points` adds the code's quantizers on the attention scores before
the relative position bias and on the bias table (`qact_attn1`, `qact_table`)."""
from __future__ import annotations

import pytest
import timm
import torch

import vitq
from vitq.models.registry import ADAPTERS
from vitq.quant import integer_fqvit
from vitq.quant.modules import QuantLayerNorm


def _swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=24, depths=(2, 2), num_heads=(2, 2), num_classes=5).eval()


def _grids(q: torch.nn.Module) -> dict[str, str]:
    return {n: p.spec.quantizer for n, p in vitq.iter_points(q) if p.configured}


def test_stage_points_put_one_plain_grid_at_each_stage_input_and_one_after_the_final_norm():
    on = _grids(vitq.quantize(_swin(), vitq.recipe("fqvit", bias_points=False)))
    off = _grids(vitq.quantize(_swin(), vitq.recipe("fqvit", stage_points=False, bias_points=False)))
    for name in ("patch_embed.proj.output", "layers.1.downsample.reduction.output"):
        assert name in off and name not in on  # the block's input point is that tensor's one quantizer
    for name in ("patch_embed.norm.input", "layers.0.blocks.0.norm1.input", "layers.1.blocks.0.norm1.input"):
        assert (off[name], on[name]) == ("ptf", "uniform"), name
    for name in ("layers.0.blocks.1.norm1.input", "layers.0.blocks.0.norm2.input", "layers.1.downsample.norm.input",
                 "norm.input"):  # the residual sums inside a stage (the code's qact4, qact2) keep PTF
        assert on[name] == off[name] == "ptf", name
    assert on["norm_output"] == "uniform" and "norm_output" not in off
    assert set(on) - set(off) == {"norm_output"}
    assert set(off) - set(on) == {"patch_embed.proj.output", "layers.1.downsample.reduction.output"}
    swin = ADAPTERS.get("swin")  # the result row's setting names the layout
    assert swin.describe(vitq.recipe("fqvit", bias_points=False).adapter_options) == "+stages"
    assert swin.describe(vitq.recipe("fqvit", stage_points=False, bias_points=False).adapter_options) == ""


def _decoded(codes: torch.Tensor, point: torch.nn.Module) -> torch.Tensor:
    q = point.quantizer
    return ((codes - float(q.zero_point.reshape(-1)[0])) * float(q.scale)).float()


def _layernorm_codes(norm: torch.nn.Module, x: torch.Tensor, out: torch.nn.Module) -> torch.Tensor:
    """The code's mode 'int' LayerNorm from the input grid's codes: PTF factors, or all ones on a plain grid."""
    q, o = norm.input_quantizer.quantizer, out.quantizer
    zp = int(q.zero_point.reshape(-1)[0])
    codes = torch.round(x / q.scale) + q.zero_point
    if norm.input_quantizer.spec.quantizer == "ptf":
        alpha, base = q.alpha, float(q.base_scale)
    else:
        alpha, base = torch.zeros(x.shape[-1]), float(q.scale)
    return integer_fqvit.layernorm_codes(codes.double(), zp, alpha, base, norm.weight, norm.bias, float(o.scale),
                                         int(o.zero_point), o.qmin, o.qmax)


def test_stage_layernorms_run_the_codes_integer_arithmetic_into_the_point_after_them():
    g = torch.Generator().manual_seed(3)
    calib, x = torch.randn(8, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    q = vitq.quantize(_swin(), vitq.recipe("fqvit"))
    vitq.calibrate(q, lambda m: m(calib))
    first = q.layers[0].blocks[0]
    assert q.patch_embed.norm.integer == "fqvit" and q.patch_embed.norm.out_point is first.norm1.input_quantizer
    assert q.norm.integer == "fqvit" and q.norm.out_point is q.norm_output_quantizer
    assert first.norm1.integer == q.layers[1].blocks[0].norm1.integer == "fqvit"  # plain-grid inputs too
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, k=k: seen.setdefault(k, a[0]))
             for k, m in {"patch_norm": q.patch_embed.norm, "block": first, "norm": q.norm}.items()]
    with torch.no_grad():
        logits = q(x)
    for h in hooks:
        h.remove()
    point = first.norm1.input_quantizer
    block_input = _decoded(_layernorm_codes(q.patch_embed.norm, seen["patch_norm"], point), point)
    torch.testing.assert_close(seen["block"], block_input, rtol=0, atol=1e-6)
    pooled = _decoded(_layernorm_codes(q.norm, seen["norm"], q.norm_output_quantizer), q.norm_output_quantizer)
    with torch.no_grad():
        torch.testing.assert_close(logits, q.forward_head(pooled), rtol=0, atol=1e-5)
        q.patch_embed.norm.integer = q.norm.integer = False
        assert not torch.allclose(q(x), logits, atol=1e-3)  # a float LayerNorm there differs


@pytest.mark.parametrize("recipe", ["repq", "isvit", "minmax"])
def test_other_recipes_keep_the_residual_layout(recipe):
    q = vitq.quantize(_swin(), vitq.recipe(recipe))
    assert q.norm_output_quantizer is None and q.layers[0].blocks[0].attn.scores_quantizer is None
    assert not q.patch_embed.norm.uniform_input


def test_without_ptf_no_layernorm_runs_integer_as_the_codes_int_norm_follows_ptf():
    """config.py: INT_NORM = ptf. The plain-grid stage LayerNorms could run integer, but the code's do not."""
    x = torch.randn(4, 3, 32, 32)
    q = vitq.quantize(_swin(), vitq.recipe("fqvit", ptf=False))
    vitq.calibrate(q, lambda m: m(x))
    norms = [m for m in q.modules() if isinstance(m, QuantLayerNorm)]
    assert norms and not any(m.integer for m in norms)
    assert q.layers[0].blocks[0].attn.softmax.integer == "fqvit"  # INT_SOFTMAX follows lis


def test_bias_points_quantize_the_scores_and_the_table_before_their_sum():
    """swin_quant.py:190-204: attn = qact_attn1(q k^T); attn = qact2(attn + qact_table(table)[index]); the
    mask after. vitq: `attn.scores`, `attn.bias_table`, then `attn.softmax.input` on their sum."""
    g = torch.Generator().manual_seed(5)
    calib, x = torch.randn(8, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    q = vitq.quantize(_swin(), vitq.recipe("fqvit"))
    vitq.calibrate(q, lambda m: m(calib))
    attn = q.layers[0].blocks[0].attn
    table = attn.relative_position_bias_table.detach()
    lo, hi = min(float(table.min()), 0.0), max(float(table.max()), 0.0)  # uint8 MinMax, 0 included
    assert float(attn.bias_table_quantizer.quantizer.scale) == pytest.approx((hi - lo) / 255, rel=1e-6)
    raw, into = [], []
    h1 = attn.matmul_qk.register_forward_hook(lambda m, a, out: raw.append(out))
    h2 = attn.softmax.register_forward_pre_hook(lambda m, a: into.append(a[0]))
    with torch.no_grad():
        q(x)
        n = attn.window_area
        bias = attn.bias_table_quantizer(table)[attn.relative_position_index.view(-1)].view(n, n, -1)
        want = attn.scores_quantizer(raw[0]) + bias.permute(2, 0, 1).unsqueeze(0)
    h1.remove()
    h2.remove()
    torch.testing.assert_close(into[0], want, rtol=0, atol=1e-6)
    floating = raw[0] + table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    assert not torch.allclose(into[0], floating, atol=1e-4)  # the two points change the sum
    off = vitq.quantize(_swin(), vitq.recipe("fqvit", bias_points=False))
    assert off.layers[0].blocks[0].attn.scores_quantizer is None
    assert ADAPTERS.get("swin").describe(vitq.recipe("fqvit").adapter_options) == "+stages+bias"
