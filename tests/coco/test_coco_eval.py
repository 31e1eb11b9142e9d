"""The COCO evaluator: ground truth fed back scores AP 1.0; the weighted re-accumulation equals COCOeval
(all weights 1) and COCOeval on a data set with duplicated images (integer weights); the paired interval."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vitq.tasks.coco_eval import METRICS, STATS, bootstrap_weights, compare_ap, evaluate_coco, evaluate_records


def load_gt(ann_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def gt_records(coco: COCO, cat_ids: list[int]) -> list[dict]:
    """The non-crowd ground truth as predictions (score 1, boxes xyxy, RLE masks)."""
    label = {c: i for i, c in enumerate(cat_ids)}
    out = []
    for img_id in sorted(coco.getImgIds()):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])) if not a["iscrowd"]]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=np.float32).reshape(-1, 4)
        out.append({"img_id": img_id, "bboxes": boxes, "scores": np.ones(len(anns), dtype=np.float32),
                    "labels": np.array([label[a["category_id"]] for a in anns]),
                    "masks": [coco.annToRLE(a) for a in anns]})
    return out


def noisy_records(records: list[dict], seed: int) -> list[dict]:
    """Ground truth with jittered boxes, random scores, some dropped, and extra false detections."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        keep = rng.random(len(r["scores"])) > 0.2
        boxes = r["bboxes"][keep] + rng.normal(0, 3, (int(keep.sum()), 4)).astype(np.float32)
        masks = [m for m, k in zip(r["masks"], keep) if k]
        labels = r["labels"][keep]
        n_extra = int(rng.integers(0, 4))
        h, w = masks[0]["size"] if masks else (96, 128)
        for _ in range(n_extra):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            boxes = np.vstack([boxes, [x, y, x + 20, y + 15]]).astype(np.float32)
            m = np.zeros((h, w), dtype=np.uint8)
            m[int(y):int(y) + 15, int(x):int(x) + 20] = 1
            masks.append(mask_utils.encode(np.asfortranarray(m)))
            labels = np.append(labels, int(rng.integers(0, 5)))
        out.append({"img_id": r["img_id"], "bboxes": boxes, "scores": rng.random(len(boxes)).astype(np.float32),
                    "labels": labels, "masks": masks})
    return out


def cat_ids_of(coco: COCO) -> list[int]:
    return sorted(coco.getCatIds())


@pytest.mark.parametrize("which", ["synthetic", "coco-mini"])
def test_ground_truth_as_predictions_scores_ap_one(which, synthetic_coco, request):
    ann = (synthetic_coco / "annotations" / "instances_val2017.json" if which == "synthetic"
           else request.getfixturevalue("coco_mini") / "annotations" / "instances.json")
    coco = load_gt(ann)
    cats = cat_ids_of(coco)
    samples = evaluate_records(coco, gt_records(coco, cats), cats, coco.getImgIds())
    assert set(samples) == set(METRICS)
    for prefix in ("box", "mask"):
        stats = samples[f"{prefix}_AP"].stats
        assert stats["AP"] == pytest.approx(100.0) and stats["AP50"] == pytest.approx(100.0)
        assert stats["AP75"] == pytest.approx(100.0)
        for s in ("APs", "APm", "APl"):  # undefined (nan) only where no object of that size exists
            assert np.isnan(stats[s]) or stats[s] == pytest.approx(100.0)
        # and the re-accumulation with unit weights agrees
        values = samples[f"{prefix}_AP"].values(torch.ones(1, len(coco.getImgIds()), dtype=torch.float64))
        assert float(values["AP"][0]) == pytest.approx(100.0)


@pytest.mark.parametrize("which", ["synthetic", "coco-mini"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_unit_weights_reproduce_cocoeval(iou_type, which, synthetic_coco, request):
    ann = (synthetic_coco / "annotations" / "instances_val2017.json" if which == "synthetic"
           else request.getfixturevalue("coco_mini") / "annotations" / "instances.json")
    coco = load_gt(ann)
    cats = cat_ids_of(coco)
    records = noisy_records(gt_records(coco, cats), seed=3)
    tables = evaluate_coco(coco, records, cats, coco.getImgIds(), iou_type)
    assert 0 < tables.stats["AP"] < 100
    values = tables.values(torch.ones(1, len(tables), dtype=torch.float64))
    for name in STATS:
        want = tables.stats[name]
        got = float(values[name][0])
        assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, abs=1e-9), name


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_integer_weights_equal_duplicated_images(iou_type, coco_mini, tmp_path):
    """Weight c on an image = COCOeval on a data set holding c copies of it (fresh ids)."""
    coco = load_gt(coco_mini / "annotations" / "instances.json")
    cats = cat_ids_of(coco)
    records = noisy_records(gt_records(coco, cats), seed=5)
    tables = evaluate_coco(coco, records, cats, coco.getImgIds(), iou_type)
    counts = [0, 1, 2, 3, 1, 0, 2, 1, 1, 4, 0, 1, 2, 1, 1]
    data = json.loads((coco_mini / "annotations" / "instances.json").read_text())
    by_img = {r["img_id"]: r for r in records}
    images, anns, dup_records = [], [], []
    next_img, next_ann = 10**7, 10**7
    for img_id, c in zip(tables.img_ids, counts):
        info = next(i for i in data["images"] if i["id"] == img_id)
        for _ in range(c):
            images.append({**info, "id": next_img})
            for a in data["annotations"]:
                if a["image_id"] == img_id:
                    anns.append({**copy.deepcopy(a), "id": next_ann, "image_id": next_img})
                    next_ann += 1
            dup_records.append({**by_img[img_id], "img_id": next_img})
            next_img += 1
    dup_file = tmp_path / "dup.json"
    dup_file.write_text(json.dumps({**data, "images": images, "annotations": anns}))
    dup = load_gt(dup_file)
    want = evaluate_coco(dup, dup_records, cats, dup.getImgIds(), iou_type).stats
    got = tables.values(torch.tensor([counts], dtype=torch.float64))
    for name in STATS:
        assert (np.isnan(want[name]) and np.isnan(float(got[name][0]))) or \
            float(got[name][0]) == pytest.approx(want[name], abs=1e-9), name


def test_paired_interval(synthetic_coco):
    coco = load_gt(synthetic_coco / "annotations" / "instances_val2017.json")
    cats = cat_ids_of(coco)
    gt = gt_records(coco, cats)
    a = evaluate_records(coco, noisy_records(gt, seed=1), cats, coco.getImgIds())
    same = compare_ap(a, a, METRICS, resamples=200)
    for m, (f, q, d, lo, hi) in same.items():
        if not np.isnan(f):
            assert (d, lo, hi) == (0.0, 0.0, 0.0), m
    b = evaluate_records(coco, gt, cats, coco.getImgIds())  # perfect predictions: better everywhere
    out = compare_ap(a, b, ("box_AP", "mask_AP"), resamples=200)
    for m, (f, q, d, lo, hi) in out.items():
        assert q == pytest.approx(100.0) and d == pytest.approx(q - f) and d > 0
        assert 0 <= lo <= d <= hi  # no resample can make the perfect predictions worse


def test_bootstrap_weights_are_counts():
    w = bootstrap_weights(7, resamples=250, seed=0)
    assert w.shape == (250, 7) and torch.all(w.sum(1) == 7)
    assert torch.equal(w, bootstrap_weights(7, resamples=250, seed=0))
