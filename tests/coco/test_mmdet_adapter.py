"""The mmdet Swin adapter: the timm Swin's point names and kinds, exact float behaviour with
quantization off, quant.detector_scope, RepQ's LayerNorm folds, backbone SQNR per recipe, and block
reconstruction on calibration images of two sizes."""
from __future__ import annotations

import copy
import re
from collections import Counter

import pytest
import torch

import vitq
from vitq.quant.points import Kind
from vitq.quant.reconstruct import ReconstructOptions, plain_fit
from vitq.report.sqnr import output_sqnr

from .conftest import needs_mmdet

pytestmark = needs_mmdet

SWIN_T = dict(type="SwinTransformer", embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
              mlp_ratio=4, qkv_bias=True, drop_path_rate=0.0, out_indices=(0, 1, 2, 3), init_cfg=None)
# random weights score every class near 1/81: keep every box; small RoI heads (CPU time)
SMALL = {"test_cfg": {"rcnn": {"score_thr": 0.0, "max_per_img": 10}, "rpn": {"nms_pre": 100, "max_per_img": 20}}}


def mmdet_swin(seed: int = 0, **cfg) -> torch.nn.Module:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    torch.manual_seed(seed)
    model = MODELS.build({**SWIN_T, **cfg})
    model.init_weights()
    model.eval()  # mmdet's SwinTransformer.train returns None
    return model


@pytest.fixture(scope="module")
def detector(one_thread):
    from vitq.tasks.coco import build_detector

    torch.manual_seed(0)
    return build_detector({"name": "cascade_mask_rcnn_swin_t", "arch": "cascade_mask_rcnn_swin_t", "kwargs": SMALL})


@pytest.fixture(scope="module")
def batch(synthetic_coco):
    """Two generated val images through the task's pipeline at short side 96, collated."""
    from mmengine.dataset import pseudo_collate

    from vitq.tasks.coco import CocoTask

    task = CocoTask({"name": "coco", "root": str(synthetic_coco), "img_size": 96, "batch_size": 2},
                    {"name": "cascade_mask_rcnn_swin_t", "arch": "cascade_mask_rcnn_swin_t"})
    ds = task.dataset("val")
    return pseudo_collate([ds[0], ds[1]])


TIMM_NAMES = [("stages.", "layers."), ("attn.w_msa.", "attn."), ("ffn.layers.0.0.", "mlp.fc1."),
              ("ffn.layers.1.", "mlp.fc2."), ("patch_embed.projection.", "patch_embed.proj.")]


def as_timm(name: str) -> str:
    for a, b in TIMM_NAMES:
        name = name.replace(a, b)
    return name


def block_points(model) -> dict[str, Counter]:
    """(name within its block / merging layer / patch embedding, kind) per unit kind."""
    out: dict[str, Counter] = {"block": Counter(), "downsample": Counter(), "patch_embed": Counter()}
    for name, p in vitq.iter_points(model):
        if p.spec is None:
            continue
        name = as_timm(name)
        if m := re.match(r"layers\.\d+\.blocks\.\d+\.(.*)", name):
            out["block"][(m.group(1), p.kind)] += 1
        elif m := re.match(r"layers\.\d+\.downsample\.(.*)", name):
            out["downsample"][(m.group(1), p.kind)] += 1
        elif name.startswith("patch_embed."):
            out["patch_embed"][(name, p.kind)] += 1
    return out


@pytest.mark.parametrize("recipe", ["fqvit", "repq"])
def test_same_point_names_and_kinds_as_timm_swin(recipe, one_thread):
    import timm

    # FQ-ViT's stage-boundary and bias points follow its timm-style Swin code, which has no detector: the mmdet
    # backbone keeps the residual layout, the one timm's Swin has with stage_points off
    timm_model = vitq.quantize(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False),
                               vitq.recipe(recipe, stage_points=False, bias_points=False))
    mm = vitq.quantize(mmdet_swin(), recipe)
    a, b = block_points(timm_model), block_points(mm)
    assert a["block"] == b["block"] and a["downsample"] == b["downsample"] and a["patch_embed"] == b["patch_embed"]
    qkv = ("attn.qkv.output", Kind.LINEAR_OUTPUT) if recipe == "fqvit" else ("attn.matmul_qk.a", Kind.MATMUL_INPUT)
    assert sum(a["block"].values()) > 0 and qkv in b["block"]  # FQ-ViT: q, k, v at the qkv output
    assert ("attn.softmax.output", Kind.SOFTMAX_OUTPUT) in b["block"]


def test_quantization_off_reproduces_the_detector(detector, batch):
    """Rewritten with every point placed (scope all) but off: the same boxes, scores, labels and masks."""
    from mmdet.models.backbones.swin import SwinBlock, WindowMSA

    q = vitq.quantize(copy.deepcopy(detector), vitq.recipe("fqvit", detector_scope="all"))
    assert not any(type(m) in (SwinBlock, WindowMSA) for m in q.modules())  # every block was converted
    with torch.no_grad():
        ref, out = detector.test_step(batch), q.test_step(batch)
    assert len(ref[0].pred_instances) > 0
    for r, o in zip(ref, out):
        for key in ("bboxes", "scores", "labels", "masks"):
            assert torch.equal(r.pred_instances[key], o.pred_instances[key]), key
    data = detector.data_preprocessor(batch, False)
    with torch.no_grad():
        for f, g in zip(detector.extract_feat(data["inputs"]), q.extract_feat(data["inputs"])):
            assert torch.equal(f, g)


@pytest.mark.parametrize("scope, parts", [("backbone", {"backbone"}), ("backbone+neck", {"backbone", "neck"}),
                                          ("all", {"backbone", "neck", "rpn_head", "roi_head"})])
def test_detector_scope(detector, scope, parts):
    q = vitq.quantize(copy.deepcopy(detector), vitq.recipe("minmax", detector_scope=scope))
    found = {n.split(".")[0] for n, p in vitq.iter_points(q) if p.spec is not None}
    assert found == parts
    for name, p in vitq.iter_points(q):  # convolution maps are quantized along their true channel axis
        if p.kind in (Kind.LINEAR_INPUT, Kind.LINEAR_OUTPUT) and name.startswith("neck."):
            assert p.channel_axis == 1, name
    row_setting = vitq.models.find_roots(q)[0][2].describe(q.vitq.recipe.adapter_options)
    assert row_setting == f"det:{scope}"
    # left float by the scope is not "no adapter covers it": only the mask heads' upsampling is
    assert {cls for _, cls in vitq.float_layers(q)} == {"ConvTranspose2d"}


def test_bad_detector_scope_is_named():
    with pytest.raises(ValueError, match="detector_scope='neck'.*backbone, backbone\\+neck, all"):
        vitq.recipe("minmax", detector_scope="neck")


def test_repq_folds_every_layernorm_pair(one_thread):
    """RepQ's reparameterization reaches mmdet's Swin through the adapter's LayerNorm -> Linear pairs:
    every qkv, fc1 and reduction input ends per tensor, with the LayerNorm affine changed."""
    fp = mmdet_swin()
    model = vitq.quantize(copy.deepcopy(fp), vitq.recipe("repq", w_bits=8, a_bits=8))
    pairs = list(vitq.models.norm_pairs(model))
    assert len(pairs) == 2 * 12 + 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 96, generator=g)
    vitq.calibrate(model, lambda m: m(x))
    for pair in pairs:
        point = pair.consumer.input_quantizer
        assert point.quantizer.scale.numel() == 1 and not point.spec.per_channel, pair.consumer_name
        before = fp.get_submodule(pair.norm_name).weight
        assert not torch.equal(before, pair.norm.weight), pair.norm_name
    levels = output_sqnr(fp, model, [torch.randn(1, 3, 64, 96, generator=g)])
    assert len(levels) == 4 and levels[0] > 30, levels  # the first level, two blocks deep, stays close


def test_backbone_sqnr_w8a8_minmax_above_30db(one_thread):
    """Random weights, noise images: each of the four output levels of a W8A8 minmax backbone."""
    fp = mmdet_swin()
    g = torch.Generator().manual_seed(0)
    calib, test = torch.randn(4, 3, 96, 128, generator=g), torch.randn(2, 3, 96, 128, generator=g)
    model = vitq.quantize(copy.deepcopy(fp), vitq.recipe("minmax"))
    vitq.calibrate(model, lambda m: m(calib))
    levels = output_sqnr(fp, model, [test])
    assert len(levels) == 4 and min(levels) > 30, levels


def test_backbone_reconstructs_on_calibration_images_of_two_sizes(one_thread):
    """A detector's calibration batches are padded to different sizes: every backbone unit caches one group
    per size (replayed with its own hw_shape) and the reconstruction raises the SQNR of both output levels.
    Measured (seeded, W4A4 minmax, 40 steps at lr 1e-3): 15.07 -> 15.48 dB and 12.14 -> 14.37 dB."""
    fp = mmdet_swin(embed_dims=24, depths=[2, 2], num_heads=[1, 2], out_indices=(0, 1))
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(2, 3, 64, 96, generator=g), torch.randn(2, 3, 96, 64, generator=g)]
    model = vitq.quantize(copy.deepcopy(fp), vitq.recipe("minmax", w_bits=4, a_bits=4))
    vitq.calibrate(model, lambda m: [m(x) for x in images])
    before = output_sqnr(fp, model, images)
    groups = {}

    def fit(objective, device, name):
        groups[name] = objective.data.sizes
        plain_fit(objective, device, name)

    options = ReconstructOptions(iters=40, batch_size=2, tune_weights=True, lr=1e-3, input_source="quant",
                                 progress=False)
    reports = vitq.reconstruct(model, fp, images, lambda m, x: m(x), options, fit=fit)
    assert [r.name for r in reports] == ["patch_embed", "stages.0.blocks.0", "stages.0.blocks.1", "stages.0.downsample",
                                         "stages.1.blocks.0", "stages.1.blocks.1"]
    assert all(sizes == [2, 2] for sizes in groups.values()), groups  # 64x96 and 96x64: two groups everywhere
    after = output_sqnr(fp, model, images)
    assert all(a > b + 0.2 for a, b in zip(after, before)), (before, after)
