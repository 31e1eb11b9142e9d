"""timm adapters: coverage of quant points, float equivalence with quantization off, state-dict keys."""
from __future__ import annotations

import collections

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.swin_transformer import PatchMerging, WindowAttention
from torch import nn

import vitq
from vitq.quant import Kind, iter_points
from vitq.quant.modules import QuantConv2d, QuantLayerNorm, QuantLinear

FULL_W8A8 = {"scope": "full", "weight": {"bits": 8}, "activation": {"bits": 8}}
MODELS = ["deit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224",
          "deit_tiny_distilled_patch16_224"]

# pinned by hand from the architectures (see test_coverage_pinned for the arithmetic)
PINNED = {
    # 12 blocks x (qkv, proj, fc1, fc2) + patch_embed.proj + head = 50 weights / linear inputs;
    # 12 x (q, k, v) matmul operands = 36; 12 softmax outputs; 12 x (norm1, norm2) + final norm = 25;
    # outputs of every linear layer except qkv (whose output is the operands q, k, v) and fc1 (quantized
    # after GELU, as fc2's input, FQ-ViT's Mlp) = 50 - 24 = 26
    "deit_tiny_patch16_224": {"weight": 50, "linear_input": 50, "matmul_input": 36, "softmax_output": 12,
                              "norm_input": 25, "linear_output": 26, "softmax_input": 12},
    "vit_small_patch16_224": {"weight": 50, "linear_input": 50, "matmul_input": 36, "softmax_output": 12,
                              "norm_input": 25, "linear_output": 26, "softmax_input": 12},
    # + head_dist
    "deit_tiny_distilled_patch16_224": {"weight": 51, "linear_input": 51, "matmul_input": 36,
                                        "softmax_output": 12, "norm_input": 25,
                                        "linear_output": 27, "softmax_input": 12},
    # depths 2+2+6+2 = 12 blocks: 48 block linears + 3 PatchMerging reductions + patch_embed.proj + head.fc = 53;
    # 24 block norms + 3 PatchMerging norms + patch_embed.norm + final norm = 29
    "swin_tiny_patch4_window7_224": {"weight": 53, "linear_input": 53, "matmul_input": 36, "softmax_output": 12,
                                     "norm_input": 29, "linear_output": 29, "softmax_input": 12},
}

pytestmark = pytest.mark.usefixtures("one_thread")




def _create(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _attentions(model):
    return [m for m in model.modules() if isinstance(m, (Attention, WindowAttention))]


def _set_fused(model, value: bool) -> None:
    for m in _attentions(model):
        m.fused_attn = value


class Case:
    def __init__(self, name: str):
        self.name = name
        self.float = _create(name, seed=0)
        self.x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
        self.fused = any(getattr(m, "fused_attn", False) for m in _attentions(self.float))
        self.y_default = _run(self.float, self.x)  # timm's default attention path (fused for ViT)
        _set_fused(self.float, False)
        self.y_explicit = _run(self.float, self.x)  # the explicit softmax(q k^T) v path
        self.structure = {
            "linear": sum(type(m) in (nn.Linear, nn.Conv2d) for m in self.float.modules()),
            "norm": sum(isinstance(m, nn.LayerNorm) for m in self.float.modules()),
            "attention": len(_attentions(self.float)),
        }
        self.quant = vitq.quantize(self.float, FULL_W8A8, inplace=False)
        self.points = dict(iter_points(self.quant))


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    return Case(request.param)


def _counts(case: Case) -> dict[str, int]:
    return dict(collections.Counter(p.kind for p in case.points.values() if p.configured))


def test_coverage_pinned(case):
    assert _counts(case) == PINNED[case.name]
    # in full scope every point is configured
    assert all(p.configured for p in case.points.values())


def test_coverage_from_structure(case):
    s = case.structure
    expected = {
        Kind.WEIGHT: s["linear"],
        Kind.LINEAR_INPUT: s["linear"],
        Kind.MATMUL_INPUT: 3 * s["attention"],  # q and k of q.k^T, v of attn.v
        Kind.SOFTMAX_OUTPUT: s["attention"],
        Kind.NORM_INPUT: s["norm"],
        Kind.LINEAR_OUTPUT: s["linear"] - 2 * s["attention"],  # every layer but qkv (as q, k, v) and fc1
        Kind.SOFTMAX_INPUT: s["attention"],
    }
    assert _counts(case) == expected


def test_swin_structure_by_stage():
    case_name = "swin_tiny_patch4_window7_224"
    model = _create(case_name, seed=0)
    depths = [len(stage.blocks) for stage in model.layers]
    assert depths == [2, 2, 6, 2]
    merges = sum(isinstance(stage.downsample, PatchMerging) for stage in model.layers)
    assert merges == 3
    blocks = sum(depths)
    linears = 4 * blocks + merges + 1 + 1  # block linears, reductions, patch_embed.proj, head.fc
    norms = 2 * blocks + merges + 1 + 1  # norm1/norm2, merge norms, patch_embed.norm, final norm
    assert PINNED[case_name] == {"weight": linears, "linear_input": linears, "matmul_input": 3 * blocks,
                                 "softmax_output": blocks, "norm_input": norms,
                                 "linear_output": linears - 2 * blocks, "softmax_input": blocks}


def test_point_names(case):
    names = set(case.points)
    if case.name.startswith("swin"):
        expected = ["layers.2.blocks.5.attn.matmul_qk.a", "layers.2.blocks.5.attn.matmul_qk.b",
                    "layers.2.blocks.5.attn.matmul_av.b", "layers.2.blocks.5.attn.softmax.output",
                    "layers.2.blocks.5.norm1.input", "layers.2.blocks.5.attn.qkv.weight",
                    "layers.1.downsample.reduction.weight", "layers.1.downsample.norm.input",
                    "patch_embed.proj.weight", "patch_embed.norm.input", "head.fc.weight", "norm.input"]
        block = "layers.0.blocks.0"
    else:
        expected = ["blocks.3.attn.matmul_qk.a", "blocks.3.attn.matmul_qk.b", "blocks.3.attn.matmul_av.b",
                    "blocks.3.attn.softmax.output", "blocks.3.norm1.input", "blocks.3.norm2.input",
                    "blocks.3.attn.qkv.input", "blocks.3.attn.qkv.weight", "blocks.3.mlp.fc2.input",
                    "patch_embed.proj.weight", "head.weight", "head.input", "norm.input"]
        if "distilled" in case.name:
            expected.append("head_dist.weight")
        block = "blocks.0"
    missing = [n for n in expected if n not in names]
    assert not missing
    # the probabilities are quantized once, at softmax.output, not again as an operand of attn @ v
    assert f"{block}.attn.matmul_av.a" not in names
    kinds = {n: p.kind for n, p in case.points.items()}
    assert kinds[f"{block}.attn.softmax.output"] == Kind.SOFTMAX_OUTPUT
    assert kinds[f"{block}.attn.matmul_qk.a"] == Kind.MATMUL_INPUT
    assert kinds[f"{block}.norm1.input"] == Kind.NORM_INPUT
    assert kinds[f"{block}.attn.qkv.weight"] == Kind.WEIGHT


def test_modules_are_converted(case):
    q = case.quant
    assert not any(type(m) in (nn.Linear, nn.Conv2d, nn.LayerNorm) for m in q.modules())
    assert sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in q.modules()) == case.structure["linear"]
    assert sum(isinstance(m, QuantLayerNorm) for m in q.modules()) == case.structure["norm"]


def test_quant_off_matches_float(case):
    y = _run(case.quant, case.x)
    assert all(p.mode == "off" for p in case.points.values())
    # against timm's default path (scaled_dot_product_attention for ViT/DeiT)
    torch.testing.assert_close(y, case.y_default, atol=1e-5, rtol=0)
    # against the same math computed explicitly: (practically) bit-exact
    torch.testing.assert_close(y, case.y_explicit, atol=1e-6, rtol=0)
    if not case.fused:  # Swin's default path is the explicit one
        assert torch.equal(y, case.y_default)


def test_float_state_dict_keys_preserved(case):
    float_sd = case.float.state_dict()
    quant_sd = case.quant.state_dict()
    assert set(float_sd) <= set(quant_sd)
    extra = set(quant_sd) - set(float_sd)
    # a scale and a zero point per quant point (full scope: every point is configured)
    assert len(extra) == 2 * len(case.points)
    assert all(k.endswith(("_quantizer.quantizer.scale", "_quantizer.quantizer.zero_point"))
                         for k in extra)
    # a float checkpoint of the same architecture (other weights) loads into the rewritten model...
    other = _create(case.name, seed=1)
    _set_fused(other, False)
    result = case.quant.load_state_dict(other.state_dict(), strict=False)
    try:
        assert result.unexpected_keys == []
        assert set(result.missing_keys) == extra
        # ...and the rewritten model then computes what that checkpoint computes
        torch.testing.assert_close(_run(case.quant, case.x), _run(other, case.x), atol=1e-6, rtol=0)
    finally:
        case.quant.load_state_dict(float_sd, strict=False)


# relative L2 of the logits, W8A8 matmul scope vs float, measured on these seeds: (lower, upper) bounds
# about 1.3x around the measurement
W8A8_REL = {"deit_tiny_patch16_224": (0.0296, 0.023, 0.038), "swin_tiny_patch4_window7_224": (0.0213, 0.016, 0.028)}


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_calibrated_w8a8_stays_close(name):
    model = _create(name, seed=0)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    y = _run(model, x)
    q = vitq.quantize(model, {"scope": "matmul", "weight": {"bits": 8, "per_channel": True},
                              "activation": {"bits": 8}})
    vitq.calibrate(q, lambda m: m(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))))
    assert all(p.mode == "quant" for p in dict(iter_points(q)).values() if p.configured)
    y_q = _run(q, x)
    rel = ((y_q - y).norm() / y.norm()).item()
    measured, lo, hi = W8A8_REL[name]
    assert lo < rel < hi, (rel, measured)
