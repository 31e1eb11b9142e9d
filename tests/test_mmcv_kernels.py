"""mmcv's RoIAlign and NMS, as the detectors call them (mmcv.ops over vitq's torchvision kernels where
mmcv-lite is installed), against references written here from the definitions in plain Python."""
from __future__ import annotations

import math
import os

import pytest
import torch

import vitq  # noqa: F401  (installs the mmcv._ext hook before mmcv.ops is imported)
from vitq import mmcv_kernels

try:
    import mmcv.ops
except ImportError:  # the det extra is not installed: make test (and CI) installs it
    if os.environ.get("CI"):
        raise
    pytest.skip("mmcv(-lite) not installed (pip install -e '.[det]')", allow_module_level=True)


# -------------------------------------------------------------------------------- RoIAlign reference
def _bilinear_weights(y: float, x: float, h: int, w: int) -> list[tuple[int, int, float]]:
    """(row, col, weight) of a bilinear sample at (y, x), Detectron's border rules."""
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return [(y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx), (y1, x0, ly * (1 - lx)), (y1, x1, ly * lx)]


def _roi_align_weights(roi, out_hw, scale, ratio, aligned, h, w):
    """For each output bin, the (row, col, weight) terms whose sum over the feature map is its value."""
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * scale - off for v in roi[1:])
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / out_hw[0], rw / out_hw[1]
    gh = ratio if ratio > 0 else math.ceil(rh / out_hw[0])
    gw = ratio if ratio > 0 else math.ceil(rw / out_hw[1])
    count = max(gh * gw, 1)
    bins = {}
    for ph in range(out_hw[0]):
        for pw in range(out_hw[1]):
            terms = []
            for iy in range(gh):
                for ix in range(gw):
                    y = y1 + ph * bh + (iy + 0.5) * bh / gh
                    x = x1 + pw * bw + (ix + 0.5) * bw / gw
                    terms += [(r, c, wt / count) for r, c, wt in _bilinear_weights(y, x, h, w)]
            bins[ph, pw] = terms
    return bins


def _roi_align_reference(feat, rois, out_hw, scale, ratio, aligned, grad_out):
    """Forward output and the gradient of sum(output * grad_out) w.r.t. feat, in double precision."""
    n, ch, h, w = feat.shape
    f = feat.double().tolist()
    out = torch.zeros(len(rois), ch, *out_hw, dtype=torch.float64)
    grad = torch.zeros(n, ch, h, w, dtype=torch.float64)
    for k, roi in enumerate(rois.tolist()):
        b = int(roi[0])
        for (ph, pw), terms in _roi_align_weights(roi, out_hw, scale, ratio, aligned, h, w).items():
            for c in range(ch):
                out[k, c, ph, pw] = sum(wt * f[b][c][r][col] for r, col, wt in terms)
                for r, col, wt in terms:
                    grad[b, c, r, col] += wt * float(grad_out[k, c, ph, pw])
    return out, grad


ROIS = torch.tensor([
    [0, 1.0, 1.5, 6.0, 5.0],     # inside
    [1, -3.0, -2.0, 4.0, 3.5],   # partly off the top-left
    [0, 5.0, 3.0, 14.0, 11.0],   # partly off the bottom-right
    [1, 2.2, 3.1, 2.5, 3.3],     # smaller than a pixel
    [0, -6.0, -6.0, -2.5, -1.5], # wholly off the map
    [1, 0.0, 0.0, 17.0, 13.0],   # the whole map (at scale 0.5)
])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [0, 2])
def test_roi_align_forward_and_backward_match_the_reference(aligned, ratio):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 7, 9, generator=g, requires_grad=True)
    out_hw, scale = (3, 2), 0.5
    layer = mmcv.ops.RoIAlign(out_hw, scale, sampling_ratio=ratio, pool_mode="avg", aligned=aligned)
    out = layer(feat, ROIS)
    grad_out = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad((out * grad_out).sum(), feat)
    ref_out, ref_grad = _roi_align_reference(feat.detach(), ROIS, out_hw, scale, ratio, aligned, grad_out)
    assert out.shape == (len(ROIS), 3, *out_hw)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)
    assert ref_out[4].abs().max() == 0 and ref_out[3].abs().max() > 0  # the off-map and sub-pixel cases bite


def test_roi_align_functional_form_matches_the_module():
    feat = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    rois = torch.tensor([[0, 0.5, 0.5, 4.5, 3.0]])
    torch.testing.assert_close(mmcv.ops.roi_align(feat, rois, (2, 2), 1.0, 0, "avg", True),
                               mmcv.ops.RoIAlign((2, 2), 1.0, 0, "avg", True)(feat, rois))


def test_roi_align_kernel_refuses_max_pooling_and_negative_aligned_rois():
    feat, out = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)
    with pytest.raises(mmcv_kernels.MissingKernelError, match="pool_mode='max'.*install_mmcv.sh"):
        mmcv_kernels.roi_align_forward(feat, torch.tensor([[0, 0.0, 0, 2, 2]]), out, out, out, 2, 2, 1.0, 0, 0, False)
    with pytest.raises(ValueError, match="non-negative size"):
        mmcv_kernels.roi_align_forward(feat, torch.tensor([[0, 3.0, 0, 2, 2]]), out, out, out, 2, 2, 1.0, 0, 1, True)


# ------------------------------------------------------------------------------------- NMS reference
def _iou(a, b, offset):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + offset)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + offset)
    inter = w * h
    area = lambda r: (r[2] - r[0] + offset) * (r[3] - r[1] + offset)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _greedy(boxes, visit, thr, offset=0):
    """Keep each box in visiting order unless it overlaps a kept one by more than thr."""
    kept = []
    for i in visit:
        if all(_iou(boxes[i], boxes[k], offset) <= thr for k in kept):
            kept.append(i)
    return kept


def _boxes(n, seed, grid=False):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 40, (n, 2), generator=g).float() if grid else torch.rand(n, 2, generator=g) * 40
    wh = torch.randint(4, 16, (n, 2), generator=g).float() if grid else 4 + torch.rand(n, 2, generator=g) * 12
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_keeps_what_greedy_nms_keeps(offset):
    boxes = _boxes(60, seed=2, grid=True)  # integer corners: the +1 areas change which boxes survive
    scores = torch.rand(60, generator=torch.Generator().manual_seed(3))
    dets, keep = mmcv.ops.nms(boxes, scores, 0.3, offset=offset)
    order = sorted(range(60), key=lambda i: -float(scores[i]))
    assert keep.tolist() == _greedy(boxes.tolist(), order, 0.3, offset)
    assert torch.equal(dets, torch.cat([boxes[keep], scores[keep, None]], 1))  # mmcv's score column
    other = mmcv.ops.nms(boxes, scores, 0.3, offset=1 - offset)[1]
    assert keep.tolist() != other.tolist()  # the offset matters on this draw


def test_nms_visits_tied_scores_in_mmcvs_order_not_a_stable_one():
    boxes = _boxes(40, seed=4)
    scores = torch.tensor([0.9, 0.5] * 20)  # two tied groups, large enough for the sort to be unstable
    visit = scores.sort(0, descending=True)[1].tolist()  # mmcv's kernel sorts with torch's default sort
    stable = scores.sort(dim=0, descending=True, stable=True)[1].tolist()
    keep = mmcv.ops.nms(boxes, scores, 0.2)[1].tolist()
    assert keep == _greedy(boxes.tolist(), visit, 0.2)
    assert keep != _greedy(boxes.tolist(), stable, 0.2)  # torchvision's own order keeps other boxes


def test_nms_score_threshold_and_max_num():
    boxes, scores = _boxes(50, seed=5), torch.rand(50, generator=torch.Generator().manual_seed(6))
    keep = mmcv.ops.nms(boxes, scores, 0.4, score_threshold=0.3, max_num=5)[1].tolist()
    valid = [i for i in sorted(range(50), key=lambda i: -float(scores[i])) if scores[i] > 0.3]
    assert keep == _greedy(boxes.tolist(), valid, 0.4)[:5] and len(keep) == 5


def test_nms_threshold_is_compared_in_single_precision():
    # IoU = 3/10 in float32 rounds to float32(0.3), above the double 0.3: mmcv (a C float threshold) keeps both
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    assert float(torch.tensor(3.0) / torch.tensor(10.0)) > 0.3
    assert mmcv.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.3)[1].tolist() == [0, 1]


def test_nms_of_no_boxes():
    dets, keep = mmcv.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert dets.shape == (0, 5) and keep.numel() == 0


def _batched_reference(boxes, scores, labels, thr, agnostic):
    if agnostic:
        kept = _greedy(boxes.tolist(), sorted(range(len(boxes)), key=lambda i: -float(scores[i])), thr)
    else:
        kept = []
        for c in labels.unique().tolist():
            members = sorted((i for i in range(len(boxes)) if labels[i] == c), key=lambda i: -float(scores[i]))
            kept += _greedy(boxes.tolist(), members, thr)
    return sorted(kept, key=lambda i: -float(scores[i]))


@pytest.mark.parametrize("split_thr", [10_000, 20])  # below: one NMS on class-offset boxes; above: per class
@pytest.mark.parametrize("agnostic", [False, True])
def test_batched_nms_is_greedy_nms_within_each_class(split_thr, agnostic):
    boxes = _boxes(45, seed=7)
    scores = torch.randperm(45, generator=torch.Generator().manual_seed(8)).float() / 45 + 0.01  # distinct
    labels = torch.randint(0, 3, (45,), generator=torch.Generator().manual_seed(9))
    cfg = {"type": "nms", "iou_threshold": 0.25, "split_thr": split_thr}
    dets, keep = mmcv.ops.batched_nms(boxes, scores, labels, cfg, class_agnostic=agnostic)
    # mmcv's rule: class_agnostic drops the class offsets, but at split_thr boxes and above NMS runs per class
    expected = _batched_reference(boxes, scores, labels, 0.25, agnostic and split_thr > 45)
    assert keep.tolist() == expected
    assert torch.equal(dets, torch.cat([boxes[keep], scores[keep, None]], 1))
    assert _batched_reference(boxes, scores, labels, 0.25, False) != _batched_reference(boxes, scores, labels, 0.25,
                                                                                      True)  # classes matter here


def test_batched_nms_max_num():
    boxes, scores = _boxes(30, seed=10), torch.rand(30, generator=torch.Generator().manual_seed(11))
    labels = torch.arange(30) % 2
    keep = mmcv.ops.batched_nms(boxes, scores, labels, {"iou_threshold": 0.3, "max_num": 4})[1]
    assert keep.tolist() == _batched_reference(boxes, scores, labels, 0.3, False)[:4]


# ---------------------------------------------------------------------------- missing kernels, hook
def test_a_missing_kernel_names_itself_its_module_and_the_fix():
    if mmcv_kernels.provider() != "torchvision":
        pytest.skip("the compiled mmcv is installed: its kernels are all there")
    with pytest.raises(mmcv_kernels.MissingKernelError,
                       match=r"'roi_pool_forward' \(used by mmcv.ops.roi_pool\).*install_mmcv.sh"):
        mmcv.ops.RoIPool((2, 2), 1.0)(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 0.0, 0, 2, 2]]))


def test_detector_config_with_an_unprovided_op_is_refused_naming_its_key():
    if mmcv_kernels.provider() != "torchvision":
        pytest.skip("the compiled mmcv is installed: its kernels are all there")
    good = {"type": "MaskRCNN", "roi_head": {"bbox_roi_extractor": {"roi_layer": {"type": "RoIAlign", "output_size": 7}}},
            "test_cfg": {"rpn": {"nms": {"type": "nms", "iou_threshold": 0.7}}}}
    mmcv_kernels.check_detector_config(good)
    bad = {**good, "roi_head": {"bbox_roi_extractor": {"roi_layer": {"type": "RoIPool", "output_size": 7}}},
           "backbone": {"dcn": {"type": "DCNv2"}}, "neck": {"upsample_cfg": {"type": "carafe"}},
           "test_cfg": {"rcnn": {"nms": {"type": "soft_nms"}}}}
    assert mmcv_kernels.missing_ops(bad) == [
        "model.roi_head.bbox_roi_extractor.roi_layer (type=RoIPool, mmcv.ops.roi_pool)",
        "model.test_cfg.rcnn.nms (type=soft_nms, mmcv.ops.nms)",
        "model.backbone.dcn (type=DCNv2, mmcv.ops.modulated_deform_conv)",
        "model.neck.upsample_cfg (type=carafe, mmcv.ops.carafe)"]
    with pytest.raises(mmcv_kernels.MissingKernelError, match=r"roi_layer \(type=RoIPool.*install_mmcv.sh"):
        mmcv_kernels.check_detector_config(bad)
    max_pool = {"roi_layer": {"type": "RoIAlign", "pool_mode": "max"}}
    assert mmcv_kernels.missing_ops(max_pool) == ["model.roi_layer (type=RoIAlign, mmcv.ops.roi_align)"]


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(mmcv_kernels.ENV, "cuda")
    with pytest.raises(ValueError, match="VITQ_MMCV_KERNELS='cuda' is not one of auto, torchvision"):
        mmcv_kernels.mode()
