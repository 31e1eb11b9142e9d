"""Cost of the AP bootstrap (tasks/coco_eval.py): coco-mini's annotations repeated R times, 100 detections
per image (jittered ground truth plus random boxes), two such "models"; CPU seconds on one thread.

    python -m bench.coco_ap_cost 5      # 75 images, 7,500 detections per model
"""
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools import mask as mask_utils
from vitq.tasks.classification import find_shared_data
from vitq.tasks.coco_eval import METRICS, compare_ap, evaluate_records

torch.set_num_threads(1)
reps = int(sys.argv[1])
mini = find_shared_data("coco-mini")
if mini is None:
    sys.exit("../shared/data/coco-mini not found")
data = json.loads((mini / "annotations" / "instances.json").read_text())
images, anns = [], []
for r in range(reps):
    for im in data["images"]:
        images.append({**im, "id": im["id"] * 100 + r})
    for a in data["annotations"]:
        anns.append({**a, "id": a["id"] * 100 + r, "image_id": a["image_id"] * 100 + r})
path = Path(tempfile.mkdtemp()) / "instances.json"
path.write_text(json.dumps({**data, "images": images, "annotations": anns}))
with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(str(path))
cats = sorted(coco.getCatIds()); label = {c: i for i, c in enumerate(cats)}
rng = np.random.default_rng(0)
def records(noise):
    out = []
    for img in images:
        h, w = img["height"], img["width"]
        gt = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])) if not a["iscrowd"]]
        boxes, labels, masks = [], [], []
        for a in gt:
            x, y, bw, bh = a["bbox"]; j = rng.normal(0, noise, 4)
            boxes.append([x + j[0], y + j[1], x + bw + j[2], y + bh + j[3]]); labels.append(label[a["category_id"]])
            masks.append(coco.annToRLE(a))
        while len(boxes) < 100:
            x, y = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            boxes.append([x, y, x + 40, y + 30]); labels.append(int(rng.integers(0, 80)))
            m = np.zeros((h, w), np.uint8); m[int(y):int(y) + 30, int(x):int(x) + 40] = 1
            masks.append(mask_utils.encode(np.asfortranarray(m)))
        out.append({"img_id": img["id"], "bboxes": np.array(boxes, np.float32), "scores": rng.random(len(boxes)).astype(np.float32),
                    "labels": np.array(labels), "masks": masks})
    return out
a, b = records(2.0), records(6.0)
t = time.process_time(); sa = evaluate_records(coco, a, cats, coco.getImgIds()); sb = evaluate_records(coco, b, cats, coco.getImgIds())
t_eval = (time.process_time() - t) / 2
t = time.process_time(); out = compare_ap(sa, sb, METRICS); t_boot = time.process_time() - t
print(json.dumps({"images": len(images), "detections": 100 * len(images), "cocoeval_cpu_s_per_model_both_iou_types": round(t_eval, 1),
                  "bootstrap_1000_cpu_s_both_models_all_12_metrics": round(t_boot, 1), "box_AP": [round(v, 2) for v in out["box_AP"]]}))
