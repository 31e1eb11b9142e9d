"""FQ-ViT's points and PTF range as its code places them (megvii-research/FQ-ViT, `models/vit_quant.py`,
`models/layers_quant.py`, `config.py`): the whole qkv output quantized once (`qact1`), fc1's output only
after GELU (`Mlp.forward`: fc1 -> act -> qact1), and PTF's layer-wise range from running min/max whatever
the calibrator (`OBSERVER_A_LN = 'ptf'`)."""
from __future__ import annotations

import pytest
import timm
import torch

import vitq
from vitq.quant import Kind


def _vit(depth: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                          num_classes=10).eval()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    return m


def test_one_vit_block_has_the_codes_quantizers():
    """Per block, the code's QActs and QLinears: qact1 (norm1 output: qkv.input), qkv weight, qact1 (qkv
    output), qact_attn1 (scores), log-int-softmax (probabilities), qact2 (attn @ v: proj.input), proj weight,
    qact3 (proj output), the block's qact1 / qact2 on the residual sums (norm1.input, norm2.input), qact3
    (norm2 output: fc1.input), fc1 weight, Mlp qact1 (GELU output: fc2.input), fc2 weight, Mlp qact2 (fc2
    output)."""
    q = vitq.quantize(_vit(), vitq.recipe("fqvit"))
    block = sorted(n[len("blocks.0."):] for n, p in vitq.iter_points(q) if p.configured and n.startswith("blocks.0."))
    assert block == sorted([
        "norm1.input", "attn.qkv.input", "attn.qkv.weight", "attn.qkv.output", "attn.softmax.input",
        "attn.softmax.output", "attn.proj.input", "attn.proj.weight", "attn.proj.output", "norm2.input",
        "mlp.fc1.input", "mlp.fc1.weight", "mlp.fc2.input", "mlp.fc2.weight", "mlp.fc2.output"])
    # the operand layout (PTQ4ViT / RepQ-ViT) keeps q, k, v as matmul inputs instead, and never both
    ops = vitq.quantize(_vit(), vitq.recipe("fqvit", attention_points="operands"))
    names = {n for n, p in vitq.iter_points(ops) if p.configured}
    assert {"blocks.0.attn.matmul_qk.a", "blocks.0.attn.matmul_qk.b", "blocks.0.attn.matmul_av.b"} <= names
    assert "blocks.0.attn.qkv.output" not in names


def test_qkv_output_grid_is_the_minmax_grid_of_the_whole_qkv_output():
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fp = _vit()
    seen = []
    h = fp.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        fp(x)
    h.remove()
    q = vitq.quantize(_vit(), vitq.recipe("fqvit"))
    vitq.calibrate(q, lambda m: m(x))
    out = seen[0]
    lo, hi = min(float(out.min()), 0.0), max(float(out.max()), 0.0)
    assert float(q.blocks[0].attn.qkv.output_quantizer.quantizer.scale) == pytest.approx((hi - lo) / 255, rel=1e-6)


@pytest.mark.parametrize("observer", ["percentile", "omse"])
def test_ptf_range_is_running_minmax_whatever_the_calibrator(observer):
    """PTF's base step is (max - min) / 255 / 2^3 of everything the LayerNorm input saw (two batches),
    while the other activations use the chosen calibrator; `ptf_range=calibrator` is the former choice."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 3, 32, 32, generator=g) * s for s in (1.0, 3.0)]
    fp = _vit()
    seen = []
    h = fp.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in batches:
            fp(b)
    h.remove()
    lo, hi = min(float(t.min()) for t in seen), max(float(t.max()) for t in seen)
    want = (max(hi, 0) - min(lo, 0)) / 255 / 8
    specs = vitq.recipe("fqvit", observer=observer).specs
    assert specs[Kind.NORM_INPUT].observer == "minmax" and specs[Kind.LINEAR_INPUT].observer == observer
    q = vitq.quantize(_vit(), vitq.recipe("fqvit", observer=observer))
    vitq.calibrate(q, lambda m: [m(b) for b in batches])
    assert float(q.blocks[0].norm1.input_quantizer.quantizer.base_scale) == pytest.approx(want, rel=1e-6)
    former = vitq.quantize(_vit(), vitq.recipe("fqvit", observer=observer, ptf_range="calibrator"))
    vitq.calibrate(former, lambda m: [m(b) for b in batches])
    assert float(former.blocks[0].norm1.input_quantizer.quantizer.base_scale) != pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError, match="ptf_range"):
        vitq.recipe("fqvit", ptf_range="max")


def test_qkv_output_needs_scope_full():
    with pytest.raises(ValueError, match="scope=matmul leaves float"):
        vitq.recipe("fqvit", scope="matmul")


def test_weights_use_the_codes_half_span_step():
    """quant=fqvit: every weight step is max|w_row| / 127.5, as FQ-ViT's MinMax observer."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1).eval()
    q = vitq.quantize(model, vitq.recipe("fqvit"))
    vitq.calibrate(q, lambda m: m(torch.randn(4, 3, 32, 32)))
    w = q.blocks[0].mlp.fc1
    want = w.weight.detach().abs().amax(1) / 127.5
    assert torch.allclose(w.weight_quantizer.quantizer.scale.reshape(-1), want, rtol=1e-6)
