"""COCO fixtures: generated COCO-format data (shapes with boxes and masks, no ../shared needed) and the
shared coco-mini images in the COCO 2017 layout (symlinks; skipped with a reason where absent)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitq.tasks.classification import find_shared_data

# COCO's 80 class names (mmdet's CocoDataset.METAINFO order), with ids 1..80 for generated data
CLASSES = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
           "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
           "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
           "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
           "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
           "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
           "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
           "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
           "scissors", "teddy bear", "hair drier", "toothbrush")


def _shapes_split(folder: Path, n: int, seed: int, start_id: int) -> dict:
    """n images of 96x128 noise with 1-4 filled rectangles / triangles; polygons, boxes, areas; the first
    image also gets a crowd region as an RLE."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        h, w = 96, 128
        img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        img_id = start_id + i
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
            bw, bh = int(rng.integers(8, 30)), int(rng.integers(8, 30))
            cat = int(rng.integers(1, 6))
            if rng.random() < 0.5:  # rectangle
                poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
            else:  # triangle
                poly = [x0, y0 + bh, x0 + bw / 2, y0, x0 + bw, y0 + bh]
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            m = mask_utils.decode(rle).astype(bool)
            img[m] = np.array([40 * cat, 255 - 40 * cat, 120], dtype=np.uint8)
            x, y, bw2, bh2 = mask_utils.toBbox(rle).tolist()
            anns.append({"id": len(anns) + 1 + start_id * 100, "image_id": img_id, "category_id": cat,
                         "segmentation": [[float(v) for v in poly]], "area": float(mask_utils.area(rle)),
                         "bbox": [x, y, bw2, bh2], "iscrowd": 0})
        if i == 0:  # one crowd region, stored as RLE (as COCO does)
            m = np.zeros((h, w), dtype=np.uint8)
            m[70:90, 90:120] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            anns.append({"id": len(anns) + 1 + start_id * 100, "image_id": img_id, "category_id": 1,
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                         "area": float(m.sum()), "bbox": [90.0, 70.0, 30.0, 20.0], "iscrowd": 1})
        name = f"{img_id:012d}.jpg"
        Image.fromarray(img).save(folder / name, quality=95)
        images.append({"id": img_id, "file_name": name, "height": h, "width": w})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": c, "supercategory": "x"} for i, c in enumerate(CLASSES)]}


def make_synthetic_coco(root: Path, n_train: int = 6, n_val: int = 5) -> Path:
    """A COCO 2017 layout with generated images and instance annotations."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, seed, start in (("train", n_train, 1, 1), ("val", n_val, 2, 1000)):
        data = _shapes_split(root / f"{split}2017", n, seed, start)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic-coco"))


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    root = find_shared_data("coco-mini")
    if root is None:
        pytest.skip("../shared/data/coco-mini is absent (see the shared data README)")
    return root


@pytest.fixture(scope="session")
def coco_mini_root(coco_mini, tmp_path_factory) -> Path:
    """coco-mini as a COCO 2017 root: its 15 images serve as train2017 and val2017 (symlinks)."""
    root = tmp_path_factory.mktemp("coco-mini-layout")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        (root / f"{split}2017").symlink_to(coco_mini / "images", target_is_directory=True)
        (root / "annotations" / f"instances_{split}2017.json").symlink_to(coco_mini / "annotations" / "instances.json")
    return root


def has_mmdet() -> bool:
    try:
        import mmdet  # noqa: F401
        from mmcv.ops import RoIAlign  # noqa: F401
    except ImportError:
        return False
    return True


# In CI (`CI` set, as .ci/run does) make test installs mmdet: a missing one fails there instead of skipping.
needs_mmdet = pytest.mark.skipif(not has_mmdet() and not os.environ.get("CI"),
                                 reason="mmdet and mmcv(-lite) not installed (make setup installs them)")
