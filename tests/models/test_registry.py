"""Adapter objects: applied to submodules, units and LayerNorm pairs listed, layouts set per point."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import vitq
from vitq.models import find_roots, norm_pairs, units
from vitq.quant import iter_points

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2)
SWIN = dict(model_name="swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
            embed_dim=24, depths=(2, 2), num_heads=(1, 2), num_classes=10)
PER_CHANNEL = {"scope": "full", "weight": {"bits": 8, "per_channel": True},
               "activation": {"bits": 8, "per_channel": True}}


class Detector(nn.Module):
    """A model whose backbone is a ViT, with a float neck of its own (as a detector would have)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model(**VIT)
        self.neck = nn.Sequential(nn.Linear(10, 10), nn.LayerNorm(10))

    def forward(self, x):
        return self.neck(self.backbone(x))


def test_adapter_applies_to_a_submodule_and_leaves_the_rest_float():
    model = Detector().eval()
    roots = find_roots(model)
    assert [(name, adapter.family) for name, _, adapter in roots] == [("backbone", "vit")]
    q = vitq.quantize(model, {"scope": "matmul", "weight": {"bits": 8}, "activation": {"bits": 8}})
    names = [n for n, _ in iter_points(q)]
    assert "backbone.blocks.0.attn.qkv.input" in names
    assert not any(n.startswith("neck") for n in names)  # outside every adapter: untouched
    assert type(q.neck[0]) is nn.Linear
    vitq.calibrate(q, lambda m: m(torch.randn(4, 3, 32, 32)))
    assert q(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_units_and_norm_pairs_vit():
    model = timm.create_model(**VIT)
    assert [n for n, _ in units(model)] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert [(p.norm_name, p.consumer_name) for p in norm_pairs(model)] == [
        ("blocks.0.norm1", "blocks.0.attn.qkv"), ("blocks.0.norm2", "blocks.0.mlp.fc1"),
        ("blocks.1.norm1", "blocks.1.attn.qkv"), ("blocks.1.norm2", "blocks.1.mlp.fc1")]


def test_units_and_norm_pairs_swin_with_prefix():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = timm.create_model(**SWIN)

    model = Wrap()
    assert [n for n, _ in units(model)] == ["body.patch_embed", "body.layers.0.blocks.0", "body.layers.0.blocks.1",
                                            "body.layers.1.downsample", "body.layers.1.blocks.0",
                                            "body.layers.1.blocks.1", "body.head"]
    pairs = [(p.norm_name, p.consumer_name) for p in norm_pairs(model)]
    assert ("body.layers.1.downsample.norm", "body.layers.1.downsample.reduction") in pairs and len(pairs) == 9


def test_rewrite_wires_each_norm_to_its_consumer():
    q = vitq.quantize(timm.create_model(**SWIN).eval(), PER_CHANNEL)
    for pair in norm_pairs(q):
        assert pair.norm.out_point is pair.consumer.input_quantizer


def test_conv_points_are_per_channel_on_axis_1():
    """Review fault 3: per-channel activations used axis -1 everywhere, i.e. per image column for a
    Conv2d input [B, C, H, W]. The patch embedding's input and output are per channel of axis 1."""
    model = timm.create_model(**VIT).eval()
    q = vitq.quantize(model, PER_CHANNEL, inplace=False)
    points = dict(iter_points(q))
    assert points["patch_embed.proj.input"].channel_axis == 1
    assert points["patch_embed.proj.output"].channel_axis == 1
    assert points["blocks.0.attn.qkv.input"].channel_axis == -1
    assert points["patch_embed.proj.weight"].channel_axis == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g) * torch.tensor([20.0, 1.0, 0.05]).view(1, 3, 1, 1)
    vitq.calibrate(q, lambda m: m(x))
    inp = points["patch_embed.proj.input"].quantizer
    assert inp.scale.shape == (3,) and inp.axis == 1
    ranges = x.amax(dim=(0, 2, 3)) - x.amin(dim=(0, 2, 3))
    assert torch.allclose(inp.scale, ranges / 255, rtol=1e-5)  # one step per RGB channel
    assert points["patch_embed.proj.output"].quantizer.scale.shape == (192,)
    # each colour channel keeps its own resolution: the faint blue channel is not rounded away
    err = (inp(x) - x).abs().amax(dim=(0, 2, 3))
    assert torch.all(err <= inp.scale / 2 + 1e-6)
