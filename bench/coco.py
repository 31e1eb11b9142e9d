"""COCO detector benchmark on the CPU: calibration time and peak memory of Cascade Mask R-CNN Swin-T on
8 images at 800x1333, per-image inference float vs fake-quant, backbone SQNR per recipe, and I&S-ViT's
reconstruction of the backbone units (SQNR before and after, cost per unit).

Random weights (seed 0; no detector weights can be downloaded here), real images: the 15 coco-mini
images (../shared/data/coco-mini) through the task's test pipeline. Each speed case runs in its own
process so its peak RSS is its own; `torch.set_num_threads(THREADS)` in every case.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench import common

ONLY = ("coco", "coco-sqnr", "coco-recon")
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


def _task(root: Path, img_size: int, batch_size: int = 1):  # noqa: ANN202
    from vitq.tasks.coco import CocoTask

    return CocoTask({"name": "coco", "root": str(root), "img_size": img_size, "batch_size": batch_size}, MODEL)


def _batches(task: Any, indices: list[int]) -> list[dict]:
    from mmengine.dataset import pseudo_collate

    ds = task.dataset("val")
    return [pseudo_collate([ds[i]]) for i in indices]


def speed_child(case: str, root: Path, img_size: int = 800) -> dict:
    """Calibrate (8 images, batch 1) and time per-image inference (4 images) of one case."""
    import vitq
    from vitq.tasks.coco import build_detector

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
        result["recipe"] = model.vitq.recipe.describe()
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
    from vitq.tasks.coco import build_detector

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
        rows.append({"label": label, "setting": model.vitq.recipe.describe(), "sqnr_db": levels,
                     "calib_seconds": seconds, "img_shape": list(calib[0].shape[2:]),
                     "load_avg_1min": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


# I&S-ViT reconstruction of the backbone units through `python train.py task=coco quant=isvit ...` (CPU preset).
RECON = {"img_size": 320, "calib": 8, "batch": 2, "iters": 30, "recon_batch": 2, "threads": 1}
# random weights score every class near 1/81: keep every box, small RoI heads (their CPU time is not measured)
SMALL_HEADS = ["+model.kwargs.test_cfg.rcnn.score_thr=0.0", "+model.kwargs.test_cfg.rcnn.max_per_img=10",
               "+model.kwargs.test_cfg.rpn.nms_pre=100", "+model.kwargs.test_cfg.rpn.max_per_img=20"]


def random_checkpoint(path: Path) -> Path:
    """The randomly initialised Cascade Mask R-CNN Swin-T (seed 0) as an mmdet checkpoint."""
    from vitq.tasks.coco import build_detector

    if not path.exists():
        torch.manual_seed(0)
        torch.save({"state_dict": build_detector(MODEL).state_dict(), "meta": {"note": "random init"}}, path)
    return path


def _train(overrides: list[str], out: Path, threads: int) -> dict:
    """`python train.py <overrides>` in its own process with `threads` intra-op threads; its wall seconds
    and peak RSS (wait4), its log kept in `out/stdout.log`."""
    import subprocess
    import sys

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    root = Path(__file__).resolve().parents[1]
    start = time.perf_counter()
    with open(out / "stdout.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={out}"], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}); see {out / 'stdout.log'}")
    return {"seconds": time.perf_counter() - start, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def recon_run(root: Path, work: Path, img_size: int = RECON["img_size"], calib: int = RECON["calib"],
              batch: int = RECON["batch"], iters: int = RECON["iters"], recon_batch: int = RECON["recon_batch"],
              threads: int = RECON["threads"], eval_images: int | None = None) -> dict:
    """I&S-ViT on the random detector's backbone units: the same run twice, once stopped after calibration
    (the model before reconstruction) and once complete; then backbone SQNR per output level of both
    against the float detector, on the calibration images and on the other coco-mini images (none of
    which calibration or reconstruction saw). `eval_images` limits the held-out images (default: all)."""
    import vitq
    from vitq.tasks.coco import backbone_sqnr, build_detector, load_detector_checkpoint

    ckpt = random_checkpoint(work / "cascade_swin_t_random.pth")
    overrides = ["task=coco", f"task.root={root}", f"task.img_size={img_size}", f"task.batch_size={batch}",
                 "task.num_workers=0", "task.eval_limit=1", f"model.checkpoint={ckpt}", "quant=isvit",
                 f"quant.iters={iters}", f"quant.recon_batch_size={recon_batch}", f"quant.calib.num_samples={calib}",
                 f"quant.calib.batch_size={batch}", "logger=csv", "trainer=cpu", "callbacks.progress=null", "+trainer.enable_progress_bar=false",
                 f"paths.cache_dir={work / 'cache'}", *SMALL_HEADS]
    before_run = _train([*overrides, "stage=calibrate"], work / "calibrated", threads)
    after_run = _train(overrides, work / "reconstructed", threads)
    row = json.loads((work / "reconstructed" / "results.json").read_text())

    torch.set_num_threads(threads)
    task = _task(root, img_size, batch)
    train, val = task.dataset("train"), task.dataset("val")
    calib_idx = list(task.calib_loader(calib, batch, 0).dataset.indices)  # the engine's draw (quant.calib.seed 0)
    calib_ids = [train.get_data_info(i)["img_id"] for i in calib_idx]
    by_id = {val.get_data_info(i)["img_id"]: i for i in range(len(val))}
    held_ids = [i for i in sorted(by_id) if i not in calib_ids][:eval_images]
    fp = load_detector_checkpoint(build_detector(MODEL), ckpt).eval()
    result: dict[str, Any] = {
        **RECON, "img_size": img_size, "calib": calib, "batch": batch, "iters": iters, "recon_batch": recon_batch,
        "threads": threads, "calib_img_ids": calib_ids, "held_out_img_ids": held_ids,
        "calib_run": before_run, "recon_run": after_run, "calib_seconds": row.get("calib_seconds"),
        "reconstruct_seconds": row.get("reconstruct_seconds"), "reconstruct_peak_mib": row.get("reconstruct_peak_mib"),
        "units": row.get("reconstruct_units", []), "sqnr_db": {}}
    for name, run_dir in (("before", "calibrated"), ("after", "reconstructed")):
        q = vitq.load_quantized(copy.deepcopy(fp), work / run_dir / "quantized.ckpt").eval()
        for images, ids in (("calibration", calib_ids), ("held-out", held_ids)):
            result["sqnr_db"][f"{images} {name}"] = backbone_sqnr(fp, q, _batches(task, [by_id[i] for i in ids]))
        del q
    # the padded sizes of the engine's calibration batches: one cache group per size in every unit
    result["calib_batch_shapes"] = [list(fp.data_preprocessor(b, False)["inputs"].shape[2:])
                                    for b in task.calib_loader(calib, batch, 0)]
    result["load_avg_1min"] = os.getloadavg()[0]
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coco-sqnr-size", type=int, default=800, help="coco: short side of the SQNR images")
    parser.add_argument("--coco-recon-size", type=int, default=320, help="coco: short side of the reconstruction images")
    parser.add_argument("--coco-recipes", default=None, help="coco: comma-separated SQNR labels; all if unset")


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    """`coco`: speed, SQNR and reconstruction; `coco-sqnr` / `coco-recon`: that part alone. Each keeps the
    other parts, and SQNR / reconstruction rows of other image sizes."""
    mini = common.shared("coco-mini")
    if mini is None:
        print("skipping coco: ../shared/data/coco-mini not found")
        return
    block = data.get("coco") or {}
    work = Path(tempfile.mkdtemp(prefix="vitq-coco-bench-"))
    root = coco_mini_root(mini, work)
    if args.only in (None, "coco", "coco-sqnr"):
        recipes = args.coco_recipes.split(",") if args.coco_recipes else None
        fresh = [{**r, "short_side": args.coco_sqnr_size} for r in sqnr_rows(root, args.coco_sqnr_size, recipes)]
        done = {(r["short_side"], r["label"]) for r in fresh}
        block["sqnr"] = [r for r in block.get("sqnr", []) if (r.get("short_side"), r["label"]) not in done] + fresh
    if args.only in (None, "coco"):
        block["speed"] = []
        for case in SPEED_CASES:  # each case in its own process, so that its peak RSS is its own
            proc = subprocess.run([sys.executable, "-m", "bench.coco", case, str(root)], cwd=common.ROOT,
                                  capture_output=True, text=True, check=True)
            block["speed"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(block["speed"][-1], flush=True)
    data["coco"] = block
    save()
    if args.only in (None, "coco", "coco-recon"):
        row = recon_run(root, work, img_size=args.coco_recon_size)
        print({k: v for k, v in row.items() if k != "units"}, flush=True)
        block["recon"] = [r for r in block.get("recon", []) if r["img_size"] != args.coco_recon_size] + [row]


def report(data: dict) -> list[str]:
    return report_lines(data["coco"]) if data.get("coco") else []


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
    for r in data.get("recon", []):
        lines += recon_lines(r)
    return lines


def recon_lines(r: dict) -> list[str]:
    """The reconstruction run of `recon_run`: SQNR before/after per level, then its cost per unit."""
    shapes = ", ".join("x".join(str(v) for v in s) for s in r["calib_batch_shapes"])
    calib, held = r["calib_img_ids"], r["held_out_img_ids"]
    lines = [f"### I&S-ViT reconstruction of the backbone units (short side {r['img_size']})", "",
             f"`python -m bench.run --only coco-recon --coco-recon-size {r['img_size']}`: `python train.py task=coco "
             f"quant=isvit quant.iters={r['iters']} quant.recon_batch_size={r['recon_batch']} "
             f"quant.calib.num_samples={r['calib']} quant.calib.batch_size={r['batch']} task.img_size={r['img_size']}` "
             f"on the random detector (`model.checkpoint`, seed 0; `quant.detector_scope=backbone`), "
             f"{r['threads']} intra-op thread (`OMP_NUM_THREADS`), each run in its own process: once with "
             "`stage=calibrate` (the model before reconstruction) and once complete (both SOS passes over the 16 "
             f"backbone units). Calibration and reconstruction images: coco-mini ids {', '.join(map(str, calib))}, "
             f"in batches of {r['batch']} padded to {shapes} (HxW), so every unit caches one group per padded size. "
             f"Backbone SQNR (dB, quantized vs float, each output level) on those images and on the {len(held)} other "
             f"coco-mini images (ids {', '.join(map(str, held))}), which neither calibration nor reconstruction saw. "
             "'After' is the whole I&S-ViT pipeline (stage 1 tuning, the exact fold, weight grids refitted, stage 3 "
             "tuning); 'before' is the calibrated model (per-channel post-LayerNorm inputs, calibrated weight grids).",
             "", "| images | model | stride 4 | stride 8 | stride 16 | stride 32 |", "|---|---|---|---|---|---|"]
    for images, n in (("calibration", len(calib)), ("held-out", len(held))):
        for model in ("before", "after"):
            values = r["sqnr_db"][f"{images} {model}"]
            lines.append(f"| {images} ({n}) | {model} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    runs = [("stage=calibrate", r["calib_run"]), ("complete run", r["recon_run"])]
    lines += ["", "Cost (wall seconds, CPU seconds of the process, its peak resident memory from `wait4`; the "
              f"1-minute load average was {r['load_avg_1min']:.1f} at the end): "
              + "; ".join(f"{name} {x['seconds']:.0f} s wall, {x['cpu_seconds']:.0f} s CPU, peak RSS "
                          f"{x['peak_rss_gib']:.2f} GiB" for name, x in runs)
              + f". In the complete run: calibration {r['calib_seconds']:.1f} s, the reconstruct stage "
              f"{r['reconstruct_seconds']:.1f} s, peak RSS during any unit {r['reconstruct_peak_mib']:.0f} MiB.", "",
              "Per unit (error = squared error per token against the float unit on the cached calibration inputs, "
              "before -> after; peak = the process's resident memory during the unit):", "",
              "| pass | unit | seconds | cache MiB | sizes | peak MiB | error before | error after |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {u['pass']} | {u['name']} | {u['seconds']:.1f} | {u['cache_mib']:.1f} | {u.get('groups', 1)} | "
              f"{u['peak_mib']:.0f} | {u['loss_before']:.4g} | {u['loss_after']:.4g} |" for u in r["units"]]
    return [*lines, ""]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one COCO speed case, printed as JSON")
    parser.add_argument("case", choices=list(SPEED_CASES))
    parser.add_argument("root", type=Path, help="coco-mini in the COCO 2017 layout (coco_mini_root)")
    a = parser.parse_args()
    print(json.dumps(speed_child(a.case, a.root)))
