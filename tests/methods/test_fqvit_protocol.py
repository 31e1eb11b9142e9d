"""FQ-ViT's points and PTF range as its code places them (megvii-research/FQ-ViT, `models/vit_quant.py`,
`models/layers_quant.py`, `config.py`): the whole qkv output quantized once (`qact1`), fc1's output only
after GELU (`Mlp.forward`: fc1 -> act -> qact1), and PTF's layer-wise range from running min/max whatever
the calibrator (`OBSERVER_A_LN = 'ptf'`)."""
from __future__ import annotations

import copy

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
    # outside the blocks: qact_input, the patch projection's weight and qact, qact_embed, qact_pos, the last
    # block's qact4 (norm.input), qact2 (head.input) and the head's weight; the head has no QAct after it
    outside = sorted(n for n, p in vitq.iter_points(q) if p.configured and not n.startswith("blocks."))
    assert outside == sorted(["patch_embed.proj.input", "patch_embed.proj.weight", "patch_embed.proj.output",
                              "tokens", "pos_embed", "norm.input", "head.input", "head.weight"])
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


def _code_ptf_alpha(calib: list[torch.Tensor], bits: int = 8) -> list[int]:
    """FQ-ViT's `PtfObserver.get_quantization_params` (ptf.py:31-63), written out from its definition: the
    range is the running min/max of every batch, the factor search scores the last batch only, channel by
    channel, the L2 error of the grids with steps s8/8, s8/4, s8/2, s8 (first of equal errors wins)."""
    lo = min(float(b.double().min()) for b in calib)
    hi = max(float(b.double().max()) for b in calib)
    qmax = 2**bits - 1
    s8 = (hi - lo) / qmax
    zp = min(max(-round(lo / s8), 0), qmax)
    last = calib[-1].double()
    alphas = []
    for j in range(last.shape[-1]):
        d = last[..., j]
        scores = []
        for a in range(4):
            s = s8 / 2 ** (3 - a)
            q = ((d / s + zp).round().clamp(0, qmax) - zp) * s
            scores.append(float((q - d).pow(2).sum()))
        alphas.append(scores.index(min(scores)))
    return alphas


def test_ptf_factor_search_scores_the_last_calibration_batch():
    """The block-0 LayerNorm input of a one-block ViT, two calibration batches: the alphas vitq chooses are
    the code's, computed from the captured inputs by the definition above; `ptf_sample=tokens` (a sample
    spanning both batches) chooses differently on this data."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, 32, 32, generator=g) * s for s in (4.0, 0.5)]
    fp = _vit()
    seen = []
    h = fp.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            fp(b)
    h.remove()
    want = _code_ptf_alpha(seen)
    q = vitq.quantize(_vit(), vitq.recipe("fqvit"))
    vitq.calibrate(q, lambda m: [m(b) for b in batches])
    got = q.blocks[0].norm1.input_quantizer.quantizer.alpha
    assert got.tolist() == want
    sampled = vitq.quantize(_vit(), vitq.recipe("fqvit", ptf_sample="tokens"))
    vitq.calibrate(sampled, lambda m: [m(b) for b in batches])
    assert sampled.blocks[0].norm1.input_quantizer.quantizer.alpha.tolist() != want
    with pytest.raises(ValueError, match="ptf_sample"):
        vitq.recipe("fqvit", ptf_sample="first_batch")


def test_final_layernorm_runs_the_codes_integer_arithmetic_into_the_head_input():
    """FQ-ViT's `forward_features` ends with `self.norm(x, blocks[-1].qact4.quantizer, qact2.quantizer)`, the
    integer LayerNorm (mode 'int') producing codes of `qact2`, the head's input quantizer. vitq's logits are
    the head applied to the class token of `integer_fqvit.layernorm_codes` on the final PTF codes, decoded on
    the head input's grid (a float LayerNorm there differs)."""
    from vitq.quant import integer_fqvit

    g = torch.Generator().manual_seed(4)
    calib, x = torch.randn(8, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)
    q = vitq.quantize(_vit(depth=2), vitq.recipe("fqvit"))
    vitq.calibrate(q, lambda m: m(calib))
    assert q.norm.integer == "fqvit" and q.norm.out_point is q.head.input_quantizer
    seen = []
    h = q.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        got = q(x)
    h.remove()
    ptf, out = q.norm.input_quantizer.quantizer, q.head.input_quantizer.quantizer
    codes = torch.round(seen[0] / ptf.scale) + ptf.zero_point  # the input's PTF codes (on the grid already)
    ln = integer_fqvit.layernorm_codes(codes.double(), int(ptf.zero_point[0]), ptf.alpha, float(ptf.base_scale),
                                       q.norm.weight, q.norm.bias, float(out.scale), int(out.zero_point),
                                       out.qmin, out.qmax)
    token = ((ln[:, 0] - float(out.zero_point)) * float(out.scale)).float()
    with torch.no_grad():
        want = q.head(token)
        q.norm.integer = False
        floating = q(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(floating, want, atol=1e-3)


def test_distilled_and_pooled_heads_keep_a_float_final_layernorm():
    """The pair needs the head to read the LayerNorm's output token by token, on its own grid: a distilled
    model's second head reads token 1 on another grid, average pooling mixes tokens."""
    from vitq.models.registry import ADAPTERS

    vit = ADAPTERS.get("vit")
    torch.manual_seed(0)
    kw = dict(pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=10)
    distilled = vitq.quantize(timm.create_model("deit_tiny_distilled_patch16_224", **kw), vitq.recipe("fqvit"))
    pooled = vitq.quantize(timm.create_model("vit_tiny_patch16_224", global_pool="avg", fc_norm=False, **kw),
                           vitq.recipe("fqvit"))
    assert vit.output_norms(distilled) == [] and vit.output_norms(pooled) == []
    assert vit.output_norms(vitq.quantize(_vit(), vitq.recipe("fqvit"))) == [("norm", "head")]


def _minmax_fake_quant(t: torch.Tensor, seen: torch.Tensor | None = None, bits: int = 8) -> torch.Tensor:
    """Per-tensor asymmetric MinMax from the definition (range of `seen`, default `t`, widened to include 0:
    FQ-ViT's uint8 grid), applied to `t`."""
    seen = t if seen is None else seen
    lo, hi = min(float(seen.min()), 0.0), max(float(seen.max()), 0.0)
    s = (hi - lo) / (2**bits - 1)
    zp = round(-lo / s)
    return ((t / s).round() + zp).clamp(0, 2**bits - 1).sub(zp).mul(s)


def _check_embedding_sum(fp: torch.nn.Module, q: torch.nn.Module, x: torch.Tensor, prefix: tuple[str, ...]) -> None:
    """Block 0's input equals MinMax(tokens) + MinMax(pos_embed): the tokens' grid from the float model's
    prefix + patch tokens (calibration runs with quantization off), applied to the quantized model's."""
    vitq.calibrate(q, lambda m: m(x))
    got, patches = [], []
    hooks = [q.blocks[0].register_forward_pre_hook(lambda m, a: got.append(a[0])),
             q.patch_embed.register_forward_hook(lambda m, a, out: patches.append(out))]
    with torch.no_grad():
        q(x)
        calib_tokens = torch.cat([*(getattr(fp, t).expand(len(x), -1, -1) for t in prefix), fp.patch_embed(x)], 1)
    for h in hooks:
        h.remove()
    tokens = torch.cat([*(getattr(q, t).expand(len(x), -1, -1) for t in prefix), patches[0]], dim=1).detach()
    want = _minmax_fake_quant(tokens, calib_tokens) + _minmax_fake_quant(q.pos_embed.detach())
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)


def test_token_and_position_embeddings_are_quantized_before_their_sum():
    """FQ-ViT's `qact_embed(cat(cls, patches)) + qact_pos(pos_embed)`, then `qact1` (vit_quant.py:389-391):
    with `embedding_points` the input of block 0's PTF point is that sum of two MinMax-quantized tensors,
    their grids from the float tokens of calibration (quantization is off then), applied to the tokens of the
    quantized patch embedding; without it (other recipes, or `quant.embedding_points=false`) the plain float
    sum."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    fp = _vit()
    q = vitq.quantize(_vit(), vitq.recipe("fqvit"))
    assert {"tokens", "pos_embed"} <= {n for n, p in vitq.iter_points(q) if p.configured}
    _check_embedding_sum(fp, q, x, ("cls_token",))
    off = vitq.quantize(_vit(), vitq.recipe("fqvit", embedding_points=False))
    assert not {"tokens", "pos_embed"} & {n for n, _ in vitq.iter_points(off)}
    full = vitq.quantize(_vit(), vitq.recipe("minmax", scope="full"))
    assert not {"tokens", "pos_embed"} & {n for n, _ in vitq.iter_points(full)}


def test_embedding_points_refuse_a_vit_that_adds_positions_another_way():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                          num_classes=10, no_embed_class=True)
    with pytest.raises(ValueError, match="embedding_points=false"):
        vitq.quantize(m, vitq.recipe("fqvit"))


def _code_lis(scores: torch.Tensor, seen: list[torch.Tensor], bits: int = 4) -> torch.Tensor:
    """FQ-ViT's `QIntSoftmax` on float scores in its last calibration batch: `qact_attn1`'s uint8 MinMax step
    from every batch seen (`seen`), the scores divided by it unrounded into `int_softmax`, then LIS (code k
    dequantizes to 2^-k, codes past 2^bits - 1 to 0). The i-exp kernel is checked against hand-worked cases
    in tests/quant/test_integer_fqvit.py."""
    from vitq.quant import integer_fqvit

    lo = min(min(float(s.double().min()) for s in seen), 0.0)
    hi = max(max(float(s.double().max()) for s in seen), 0.0)
    step = (hi - lo) / 255
    zp = min(max(round(-lo / step), 0), 255)
    codes = integer_fqvit.softmax_codes(scores.double() / step + zp, zp, step, bits).double()
    return torch.where(codes > 2**bits - 1, torch.zeros_like(codes), torch.exp2(-codes))


@pytest.mark.parametrize("batches, bits", [(2, 4), (None, 8)])
def test_the_last_calibration_batch_passes_the_codes_integer_lis_probabilities(batches, bits):
    """FQ-ViT's `qact_attn1` sets its step only in the last calibration batch, and from then on
    `log_int_softmax(attn, qact_attn1.quantizer.scale)` runs the integer LIS softmax (models/ptq/layers.py,
    `QIntSoftmax.forward`): the attn·v points calibrate on those probabilities in that batch. With
    `batches` given, batch 0 passes the float softmax and batch 1 the code's LIS; without it, every batch is
    taken as the last."""
    g = torch.Generator().manual_seed(6)
    data = [torch.randn(4, 3, 32, 32, generator=g) * s for s in (1.0, 2.0)]
    q = vitq.quantize(_vit(), vitq.recipe("fqvit", attn_bits=bits))
    scores, probs = [], []

    def keep(m, a, out):  # noqa: ANN001
        scores.append(a[0].detach().clone())
        probs.append(out.detach().clone())

    h = q.blocks[0].attn.softmax.register_forward_hook(keep)
    vitq.calibrate(q, lambda m: [m(b) for b in data], batches=batches)
    h.remove()
    if batches == 2:
        torch.testing.assert_close(probs[0], scores[0].softmax(-1))
    else:
        assert torch.equal(probs[0], _code_lis(scores[0], scores[:1], bits).float())
    assert torch.equal(probs[1], _code_lis(scores[1], scores, bits).float())
    off = vitq.quantize(_vit(), vitq.recipe("fqvit", lis_in_calibration=False))
    probs.clear()
    h = off.blocks[0].attn.softmax.register_forward_hook(lambda m, a, out: probs.append(out) and None)
    vitq.calibrate(off, lambda m: [m(b) for b in data], batches=batches)
    h.remove()
    torch.testing.assert_close(probs[1], scores[1].softmax(-1))


def test_a_sharded_calibration_is_refused_when_the_last_batch_matters():
    q = vitq.quantize(_vit(), vitq.recipe("fqvit"))
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="whole_set=False.*every calibration batch in one order"):
        vitq.calibrate(q, lambda m: m(x), whole_set=False)
    off = vitq.quantize(_vit(), vitq.recipe("fqvit", lis_in_calibration=False))
    vitq.calibrate(off, lambda m: m(x), whole_set=False)  # no module acts on the last batch: shards are fine


def test_a_distilled_deit_quantizes_its_distillation_token_with_the_others():
    """DeiT's distillation token is prepended after the class token (timm's `VisionTransformerDistilled`):
    `tokens` quantizes [cls, dist, patches] before the position embedding is added."""
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                          num_classes=10).eval()
    fp = copy.deepcopy(m)
    q = vitq.quantize(m, vitq.recipe("fqvit"))
    _check_embedding_sum(fp, q, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7)),
                         ("cls_token", "dist_token"))
