"""COCO detector benchmark on the CPU: calibration time and peak memory of Cascade Mask R-CNN Swin-T on
8 images at 800x1333, per-image inference float vs fake-quant, and backbone SQNR per recipe.

Random weights (seed 0; no detector weights can be downloaded here), real images: the 15 coco-mini
images (../shared/data/coco-mini) through the task's test pipeline. Each speed case runs in its own
process so its peak RSS is its own; `torch.set_num_threads(THREADS)` in every case.
"""
from __future__ import annotations

import copy
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

THREADS = 2
CALIB, EVAL = 8, 2  # speed: calibration images, timed inference images (after one warm-up image)
SQNR_CALIB, SQNR_EVAL = 4, 2
SQNR_RECIPES = {  # label -> (recipe, overrides)
    "minmax W8A8": ("minmax", {}),
    "percentile W8A8": ("percentile", {}),
    "omse W8A8": ("omse", {}),
    "fqvit 8/8/4 (full)": ("fqvit", {}),
    "repq W8A8": ("repq", {"w_bits": 8, "a_bits": 8}),
    "repq W6A6": ("repq", {"w_bits": 6, "a_bits": 6}),
    "repq W4A4": ("repq", {}),
    "minmax W4A4": ("minmax", {"w_bits": 4, "a_bits": 4}),
}
SPEED_CASES = {"float": None, "fqvit": ("fqvit", {})}  # the headline recipe; each case costs minutes here
MODEL = {"name": "cascade_mask_rcnn_swin_t", "arch": "cascade_mask_rcnn_swin_t"}


def coco_mini_root(shared: Path, tmp: Path) -> Path:
    """coco-mini in the COCO 2017 layout (symlinks), as the task expects."""
    root = tmp / "coco-mini-layout"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        link = root / f"{split}2017"
        if not link.exists():
            link.symlink_to(shared / "images", target_is_directory=True)
        ann = root / "annotations" / f"instances_{split}2017.json"
        if not ann.exists():
            ann.symlink_to(shared / "annotations" / "instances.json")
    return root


def _task(root: Path, img_size: int):  # noqa: ANN202
    from tasks.coco import CocoTask

    return CocoTask({"name": "coco", "root": str(root), "img_size": img_size, "batch_size": 1}, MODEL)


def _batches(task: Any, indices: list[int]) -> list[dict]:
    from mmengine.dataset import pseudo_collate

    ds = task.dataset("val")
    return [pseudo_collate([ds[i]]) for i in indices]


def speed_child(case: str, root: Path, img_size: int = 800) -> dict:
    """Calibrate (8 images, batch 1) and time per-image inference (4 images) of one case."""
    import vitq
    from tasks.coco import build_detector

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    task = _task(root, img_size)
    model = build_detector(MODEL)
    calib, evaluate = _batches(task, list(range(CALIB))), _batches(task, list(range(CALIB, CALIB + EVAL)))
    result: dict[str, Any] = {"case": case, "threads": THREADS, "img_shape": list(calib[0]["inputs"][0].shape[1:])}
    if SPEED_CASES[case] is not None:
        name, overrides = SPEED_CASES[case]
        vitq.quantize(model, vitq.recipe(name, **overrides))
        start, cpu = time.perf_counter(), time.process_time()
        vitq.calibrate(model, lambda m: [m.test_step(b) for b in calib])
        result["calib_seconds"] = time.perf_counter() - start
        result["calib_cpu_seconds"] = time.process_time() - cpu  # CPU time of all threads: less load-dependent
        result["recipe"] = model.vitq_recipe.describe()
    with torch.inference_mode():
        model.test_step(evaluate[0])  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        for b in evaluate:
            model.test_step(b)
        result["infer_seconds_per_image"] = (time.perf_counter() - start) / len(evaluate)
        result["infer_cpu_seconds_per_image"] = (time.process_time() - cpu) / len(evaluate)
    result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["load_avg_1min"] = os.getloadavg()[0]  # other work on the machine at the end of the case
    return result


def sqnr_rows(root: Path, img_size: int = 800, recipes: list[str] | None = None) -> list[dict]:
    """SQNR (dB) of each backbone output level (strides 4, 8, 16, 32), quantized vs float, per recipe:
    calibrated on SQNR_CALIB images, measured on SQNR_EVAL others, random weights (seed 0)."""
    import vitq
    from vitq.report.sqnr import output_sqnr
    from tasks.coco import build_detector

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    task = _task(root, img_size)
    detector = build_detector(MODEL)
    pre = detector.data_preprocessor

    def images(indices: list[int]) -> list[torch.Tensor]:
        return [pre(b, False)["inputs"] for b in _batches(task, indices)]

    calib = images(list(range(SQNR_CALIB)))
    evaluate = images(list(range(SQNR_CALIB, SQNR_CALIB + SQNR_EVAL)))
    fp = detector.backbone
    fp.eval()  # mmdet's SwinTransformer.train returns None
    rows = []
    for label, (name, overrides) in SQNR_RECIPES.items():
        if recipes is not None and label not in recipes:
            continue
        model = vitq.quantize(copy.deepcopy(fp), vitq.recipe(name, **overrides))
        start = time.perf_counter()
        vitq.calibrate(model, lambda m: [m(x) for x in calib])
        seconds = time.perf_counter() - start
        levels = output_sqnr(fp, model, evaluate)
        rows.append({"label": label, "setting": model.vitq_recipe.describe(), "sqnr_db": levels,
                     "calib_seconds": seconds, "img_shape": list(calib[0].shape[2:]),
                     "load_avg_1min": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


def report_lines(data: dict) -> list[str]:
    speed, sqnr = data.get("speed", []), data.get("sqnr", [])
    lines = ["## COCO detector on the CPU (Cascade Mask R-CNN Swin-T)", "",
             "`python -m bench.run --only coco`. Random weights (seed 0), real images: coco-mini through the task's "
             f"test pipeline at short side 800 (its 640x480 images become 1067x800, padded to 1088x800), "
             f"`torch.set_num_threads({THREADS})` in every case, on a shared 2-core machine (timings are noisy). "
             "Each speed case runs in its own process (peak = max RSS). The detector's test config is mmdet's: "
             "the three 4conv1fc box heads run on all 1,000 proposals (most of the time), while random weights "
             "give few boxes above the 0.05 score threshold, so the mask heads do little work (a trained "
             "detector spends more there).", ""]
    if speed:
        fl = next((r for r in speed if r["case"] == "float"), None)
        lines += [f"Calibration on {CALIB} images (batch 1), inference on {EVAL} others (after one warm-up image). "
                  "Wall seconds, and where recorded the process's CPU seconds (all threads; less dependent on other "
                  "work); the 1-minute load average at the end of each case says how busy the machine was:", "",
                  "| case | recipe | calibration s (CPU s) | inference s/image (CPU s) | vs float | peak GiB | load avg |",
                  "|---|---|---|---|---|---|---|"]
        for r in speed:
            calib = "" if r.get("calib_seconds") is None else f"{r['calib_seconds']:.1f}" + (
                f" ({r['calib_cpu_seconds']:.1f})" if "calib_cpu_seconds" in r else "")
            infer = f"{r['infer_seconds_per_image']:.2f}" + (
                f" ({r['infer_cpu_seconds_per_image']:.2f})" if "infer_cpu_seconds_per_image" in r else "")
            ratio = f"{r['infer_seconds_per_image'] / fl['infer_seconds_per_image']:.2f}x" if fl else ""
            lines.append(f"| {r['case']} | {r.get('recipe', 'float')} | {calib} | {infer} | "
                         f"{ratio} | {r['peak_gib']:.2f} | {r.get('load_avg_1min', float('nan')):.1f} |")
        lines.append("")
    if sqnr:
        lines += ["Backbone SQNR per output level (dB, quantized vs float; the four FPN inputs at strides 4, 8, 16, 32), "
                  f"calibrated on {SQNR_CALIB} images and measured on {SQNR_EVAL} others, backbone only (`quant.detector_scope="
                  "backbone`), random weights; `--only coco-sqnr --coco-sqnr-size N` measures at short side N:", "",
                  "| image (HxW) | recipe | setting | stride 4 | stride 8 | stride 16 | stride 32 | calibration s | load avg |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sqnr:
            shape = "x".join(str(v) for v in r.get("img_shape", []))
            lines.append(f"| {shape} | {r['label']} | {r['setting']} | " + " | ".join(f"{v:.1f}" for v in r["sqnr_db"])
                         + f" | {r['calib_seconds']:.1f} | {r.get('load_avg_1min', float('nan')):.1f} |")
        lines.append("")
    return lines
