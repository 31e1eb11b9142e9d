"""COCO box and mask AP, with paired bootstrap intervals over images.

AP is not a mean of per-image outcomes, so the per-image record of a model is what COCOeval's
`evaluate()` computes for each image: its detections (score, matched or not at each IoU threshold,
ignored or not, for each area range) and its number of non-ignored ground-truth objects, per category.
`evaluate()` (the matching, the expensive part) runs once per model. A bootstrap resample draws images
with replacement; an image drawn c times counts c times. `accumulate()` is then recomputed from
these tables with per-image weights c, vectorised over resamples: the cumulative true / false
positives are weighted sums in the fixed score order, and the 101-point interpolated precision follows
COCOeval's definition. With every weight 1 this is COCOeval's AP exactly (tested), and a weight of c
equals c copies of the image (tested against COCOeval on a duplicated data set).

The same resampled images serve the float and the quantized model (a paired interval). Cost: one
COCOeval `evaluate()` per model and IoU type, then about R x (detections) x 10 thresholds x 4 area
ranges operations for R resamples (docs/coco.md quotes the measured times).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, Sequence

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pycocotools (the `det` extra) is imported on use
    from pycocotools.coco import COCO

IOU_TYPES = {"box": "bbox", "mask": "segm"}
# metric suffix -> (area range index, IoU threshold index or None for all): COCOeval.stats[0:6]
STATS = {"AP": (0, None), "AP50": (0, 0), "AP75": (0, 5), "APs": (1, None), "APm": (2, None), "APl": (3, None)}
METRICS = tuple(f"{p}_{s}" for p in IOU_TYPES for s in STATS)


def prediction_record(sample: Any) -> dict:
    """A DetDataSample's predictions in CocoMetric's per-image format (boxes xyxy, RLE masks)."""
    from pycocotools import mask as mask_utils

    pred = sample.pred_instances
    record = {"img_id": int(sample.img_id), "bboxes": pred.bboxes.detach().cpu().numpy(),
              "scores": pred.scores.detach().cpu().numpy(), "labels": pred.labels.detach().cpu().numpy()}
    if "masks" in pred:
        masks = pred.masks.detach().cpu().numpy().astype(np.uint8)
        record["masks"] = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    return record


def to_coco_results(records: Sequence[dict], cat_ids: Sequence[int], iou_type: str) -> list[dict]:
    """COCO result dicts; mask results carry no box, so their area is the mask's (as CocoMetric does)."""
    out = []
    for r in records:
        for i, (box, score, label) in enumerate(zip(r["bboxes"], r["scores"], r["labels"])):
            entry = {"image_id": r["img_id"], "category_id": int(cat_ids[int(label)]), "score": float(score)}
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in box)
                entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                entry["segmentation"] = r["masks"][i]
            out.append(entry)
    return out


@dataclass
class _Table:
    """One (category, area range): its detections in COCOeval's score order, and the images' counts."""

    img: np.ndarray  # [D] image index of each detection
    tp: np.ndarray  # [T, D] matched and not ignored
    fp: np.ndarray  # [T, D] unmatched and not ignored
    npig: np.ndarray  # [I] non-ignored ground-truth objects per image


@dataclass
class MatchTables:
    """One model's per-image COCO matching for one IoU type; `stats` is COCOeval.stats[0:6]."""

    img_ids: list[int]
    iou_type: str
    tables: dict[tuple[int, int], _Table]  # (category index, area index) -> table
    num_cats: int
    num_thresholds: int
    rec_thrs: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.img_ids)

    def values(self, weights: torch.Tensor, max_elements: int = 4_000_000) -> dict[str, torch.Tensor]:
        """Every STATS entry under image weights [R, I] (x100; nan where no category has ground truth).
        Resamples go through in chunks of at most `max_elements` cumulative counts (bounded memory)."""
        R, I = weights.shape
        T, K, A = self.num_thresholds, self.num_cats, 4
        sums = torch.zeros(R, K, A, T, dtype=torch.float64)
        valid = torch.zeros(R, K, A, dtype=torch.bool)
        thr = torch.as_tensor(self.rec_thrs, dtype=torch.float64)
        w64 = weights.double()
        for (k, a), t in self.tables.items():
            npig = w64 @ torch.as_tensor(t.npig, dtype=torch.float64)  # [R]
            valid[:, k, a] = npig > 0
            D = len(t.img)
            if D == 0:
                continue  # ground truth but no detection: precision 0 everywhere
            img = torch.as_tensor(t.img)
            tp, fp = torch.as_tensor(t.tp, dtype=torch.float64), torch.as_tensor(t.fp, dtype=torch.float64)
            chunk = max(1, max_elements // (T * D))
            for s in range(0, R, chunk):
                w = w64[s:s + chunk, img]  # [r, D]
                tpc = torch.cumsum(w[:, None, :] * tp[None], dim=-1)  # [r, T, D]
                fpc = torch.cumsum(w[:, None, :] * fp[None], dim=-1)
                rc = tpc / npig[s:s + chunk, None, None].clamp(min=1e-300)
                pr = tpc / (fpc + tpc + np.spacing(1))
                pr = torch.flip(torch.cummax(torch.flip(pr, [-1]), dim=-1).values, [-1])  # precision envelope
                idx = torch.searchsorted(rc.contiguous(), thr.expand(*rc.shape[:2], -1).contiguous(), side="left")
                q = torch.gather(pr, -1, idx.clamp(max=D - 1)) * (idx < D)
                sums[s:s + chunk, k, a] = q.sum(-1)
        out = {}
        n_r = len(self.rec_thrs)
        for name, (a, t) in STATS.items():
            num = sums[:, :, a, :] if t is None else sums[:, :, a, t:t + 1]  # [R, K, T']
            ok = valid[:, :, a]
            count = ok.sum(-1) * num.shape[-1] * n_r
            total = (num * ok[..., None]).sum((-1, -2))
            out[name] = torch.where(count > 0, 100.0 * total / count.clamp(min=1), torch.full_like(total, float("nan")))
        return out


def evaluate_coco(coco_gt: COCO, records: Sequence[dict], cat_ids: Sequence[int], img_ids: Sequence[int],
                  iou_type: str) -> MatchTables:
    """Run COCOeval (evaluate, accumulate, summarize) on the given images; keep its per-image matching."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = to_coco_results(records, cat_ids, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        if not results:
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = sorted(int(i) for i in img_ids)
        ev.params.catIds = sorted(int(c) for c in cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    p = ev.params
    I, A, K, T = len(p.imgIds), len(p.areaRng), len(p.catIds), len(p.iouThrs)
    max_det = p.maxDets[-1]
    tables = {}
    for k in range(K):
        for a in range(A):
            entries = [(i, ev.evalImgs[k * A * I + a * I + i]) for i in range(I)]
            entries = [(i, e) for i, e in entries if e is not None]
            if not entries:
                continue
            npig = np.zeros(I)
            for i, e in entries:
                npig[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            scores = np.concatenate([np.asarray(e["dtScores"][:max_det], dtype=float) for _, e in entries])
            order = np.argsort(-scores, kind="mergesort")  # COCOeval's order
            img = np.concatenate([np.full(min(len(e["dtScores"]), max_det), i) for i, e in entries])[order]
            dtm = np.concatenate([np.asarray(e["dtMatches"])[:, :max_det] for _, e in entries], axis=1)[:, order]
            dtig = np.concatenate([np.asarray(e["dtIgnore"])[:, :max_det] for _, e in entries], axis=1)[:, order]
            dtm = dtm.reshape(T, -1) > 0
            dtig = dtig.reshape(T, -1).astype(bool)
            tables[(k, a)] = _Table(img=img.astype(np.int64), tp=dtm & ~dtig, fp=~dtm & ~dtig, npig=npig)
    stats = {name: 100.0 * float(ev.stats[j]) if ev.stats[j] >= 0 else float("nan")
             for j, name in enumerate(STATS)}
    return MatchTables(img_ids=list(p.imgIds), iou_type=iou_type, tables=tables, num_cats=K, num_thresholds=T,
                       rec_thrs=np.asarray(p.recThrs), stats=stats)


def evaluate_records(coco_gt: COCO, records: Sequence[dict], cat_ids: Sequence[int],
                     img_ids: Sequence[int]) -> dict[str, MatchTables]:
    """Per metric name (`box_AP`, ..., `mask_APl`), the matching tables of its IoU type."""
    has_masks = any("masks" in r for r in records) or not records
    samples = {}
    for prefix, iou_type in IOU_TYPES.items():
        if iou_type == "segm" and not has_masks:
            continue
        tables = evaluate_coco(coco_gt, records, cat_ids, img_ids, iou_type)
        samples.update({f"{prefix}_{s}": tables for s in STATS})
    return samples


def bootstrap_weights(n: int, resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """[resamples, n] counts of each image in each resample (the same draws as `paired_bootstrap`)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, resamples, 100):
        idx = torch.randint(n, (min(100, resamples - start), n), generator=g)
        rows.append(torch.zeros(idx.shape[0], n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=torch.float64)))
    return torch.cat(rows)


def compare_ap(fp: dict[str, MatchTables], quant: dict[str, MatchTables], metrics: tuple[str, ...],
               resamples: int = 1000, seed: int = 0, level: float = 0.95
               ) -> dict[str, tuple[float, float, float, float, float]]:
    """(fp, quant, delta, low, high) per metric: COCOeval's values, and the paired bootstrap interval of
    the difference (images resampled with replacement, the same draws for both models)."""
    out: dict[str, tuple[float, float, float, float, float]] = {}
    cache: dict[int, dict[str, torch.Tensor]] = {}
    tail = (1.0 - level) / 2
    weights = None
    for m in metrics:
        f, q = fp[m], quant[m]
        if f.img_ids != q.img_ids:
            raise ValueError(f"{m}: the float and quantized models were evaluated on different images")
        if weights is None:
            weights = bootstrap_weights(len(f), resamples, seed)
        for t in (f, q):
            if id(t) not in cache:
                cache[id(t)] = t.values(weights)
        stat = m.split("_", 1)[1]
        diff = cache[id(q)][stat] - cache[id(f)][stat]
        diff = diff[~torch.isnan(diff)]
        fv, qv = f.stats[stat], q.stats[stat]
        if diff.numel() == 0:
            low = high = float("nan")
        else:
            low, high = torch.quantile(diff, torch.tensor([tail, 1.0 - tail], dtype=diff.dtype)).tolist()
        out[m] = (fv, qv, qv - fv, low, high)
    return out
