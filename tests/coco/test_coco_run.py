"""`python train.py task=coco ...` end to end with a randomly initialised Cascade Mask R-CNN Swin-T at a
small input size (short side 96): calibrate, evaluate float and quantized, write the result row; the
start-up errors for a missing or incomplete COCO root."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vitq.engine.run import run

from .conftest import needs_mmdet

CONF = str(Path(__file__).resolve().parents[2] / "conf")
# Random weights score every class near 1/81: keep every box (score_thr 0), and keep the RoI heads small
# (20 proposals, 10 detections per image: the 4conv1fc box heads, not the backbone, dominate CPU time).
SMALL = ["+model.kwargs.test_cfg.rcnn.score_thr=0.0", "+model.kwargs.test_cfg.rcnn.max_per_img=10",
         "+model.kwargs.test_cfg.rpn.nms_pre=100", "+model.kwargs.test_cfg.rpn.max_per_img=20"]


def coco_cfg(tmp: Path, root: Path | None, *overrides: str):
    base = ["task=coco", "task.img_size=96", "task.batch_size=2", "task.num_workers=0", "logger=csv",
            f"paths.cache_dir={tmp / 'cache'}", "quant.calib.num_samples=2", "quant.calib.batch_size=2"]
    if root is not None:
        base.append(f"task.root={root}")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised Cascade Mask R-CNN Swin-T saved as an mmdet checkpoint (seed 0)."""
    from vitq.tasks.coco import build_detector

    torch.manual_seed(0)
    model = build_detector({"name": "cascade_mask_rcnn_swin_t", "arch": "cascade_mask_rcnn_swin_t"})
    path = tmp_path_factory.mktemp("ckpt") / "cascade_swin_t_random.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"note": "random init"}}, path)
    return path


def check_row(row: dict, out: Path, images: int, recipe: str) -> None:
    assert not (out / "FAILED").exists()
    stored = json.loads((out / "results.json").read_text())
    assert stored["task"] == "coco" and stored["model"] == "cascade_mask_rcnn_swin_t"
    assert stored["recipe"] == recipe and stored["primary"] == "box_AP" and stored["eval_samples"] == images
    assert stored["detector_scope"] == "backbone" and "det:backbone" in stored["setting"]
    for m in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
        f, q, d = stored[f"fp_{m}"], stored[f"quant_{m}"], stored[f"delta_{m}"]
        assert 0 <= f <= 100 and 0 <= q <= 100 and d == pytest.approx(q - f)
        lo, hi = stored[f"delta_{m}_ci"]
        assert lo <= hi
    assert (out / "quantized.ckpt").is_file() and (out / "points.csv").is_file()
    assert row["fp_box_AP"] == stored["fp_box_AP"] or math.isnan(stored["fp_box_AP"])


@needs_mmdet
@pytest.mark.parametrize("data", ["synthetic", "coco-mini"])
def test_minmax_end_to_end(data, request, random_checkpoint, tmp_path, one_thread):
    root = request.getfixturevalue("synthetic_coco" if data == "synthetic" else "coco_mini_root")
    images = 5 if data == "synthetic" else 15
    cfg = coco_cfg(tmp_path, root, "quant=minmax", f"model.checkpoint={random_checkpoint}", *SMALL)
    out = tmp_path / "out"
    check_row(run(cfg, out), out, images, "minmax")


@needs_mmdet
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fqvit", "repq"])
def test_methods_end_to_end_on_coco_mini(recipe, coco_mini_root, random_checkpoint, tmp_path, one_thread):
    cfg = coco_cfg(tmp_path, coco_mini_root, f"quant={recipe}", f"model.checkpoint={random_checkpoint}", *SMALL)
    out = tmp_path / "out"
    row = run(cfg, out)
    check_row(row, out, 15, recipe)
    # the saved model evaluates to the same quantized metrics
    again = run(coco_cfg(tmp_path, coco_mini_root, f"quant={recipe}", f"model.checkpoint={random_checkpoint}",
                         *SMALL, "stage=test", f"quant.from_checkpoint={out / 'quantized.ckpt'}"),
                tmp_path / "out2")
    for m in ("box_AP", "mask_AP"):
        assert again[f"quant_{m}"] == pytest.approx(row[f"quant_{m}"]) or (
            math.isnan(again[f"quant_{m}"]) and math.isnan(row[f"quant_{m}"]))


# Small settings for the searches and the reconstruction (the methods' defaults are for 256-1024 images).
METHODS = {
    "liu21": ["quant.mixed_precision=true", "quant.candidates=5", "quant.rounds=2", "quant.rank_pairs=16",
              "quant.search_samples=2"],
    "noisyquant": ["quant.noisy_samples=1024", "quant.noisy_candidates=41", "quant.noisy_clip_candidates=50"],
}


@needs_mmdet
@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(METHODS))
def test_more_methods_on_coco_mini_backbone(recipe, coco_mini_root, random_checkpoint, tmp_path, one_thread):
    """liu21 (mixed precision) and noisyquant on the detector's backbone (isvit: the test below)."""
    cfg = coco_cfg(tmp_path, coco_mini_root, f"quant={recipe}", f"model.checkpoint={random_checkpoint}", *SMALL,
                   *METHODS[recipe])
    out = tmp_path / "out"
    row = run(cfg, out)
    check_row(row, out, 15, recipe)
    stored = json.loads((out / "results.json").read_text())
    assert stored["calib_seconds"] > 0
    points = (out / "points.csv").read_text().splitlines()
    assert any(line.startswith("backbone.") for line in points[1:])
    assert not any(line.startswith(("neck.", "rpn_head.", "roi_head.")) for line in points[1:])
    if recipe == "liu21":
        bits = stored["bit_map"]
        assert bits and all(k.startswith("backbone.") for k in bits)
        assert all(b is not None for b in bits.values())
    if recipe == "noisyquant":
        assert stored["noisy_layers"] > 0


def test_missing_root_is_named(tmp_path):
    with pytest.raises(ValueError, match="task=coco needs task.root=.*train2017.*instances_val2017.json"):
        run(coco_cfg(tmp_path, None, "quant=minmax"), tmp_path / "out")
    assert (tmp_path / "out" / "FAILED").is_file()


def test_incomplete_root_names_what_is_missing(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        run(coco_cfg(tmp_path, root, "quant=minmax"), tmp_path / "out")
    msg = str(e.value)
    assert "val2017 (val images)" in msg and "annotations/instances_val2017.json (val annotations)" in msg
    assert "train2017 (" not in msg and "expected the COCO 2017 layout" in msg


def test_task_selects_the_cascade_detector_by_default(tmp_path):
    cfg = coco_cfg(tmp_path, tmp_path)
    assert cfg.model.name == "cascade_mask_rcnn_swin_t" and cfg.quant.detector_scope == "backbone"
    cfg = coco_cfg(tmp_path, tmp_path, "model=mask_rcnn_swin_s", "quant=repq", "quant.detector_scope=all")
    assert cfg.model.name == "mask_rcnn_swin_s" and cfg.quant.detector_scope == "all"


@needs_mmdet
@pytest.mark.parametrize("stage", ["analyze", "export"])
def test_deployment_stages_refuse_a_detector_before_calibrating(synthetic_coco, tmp_path, stage):
    out = tmp_path / stage
    with pytest.raises(ValueError, match="stage=analyze and stage=export take tasks whose batches start with an "
                                         "image tensor"):
        run(coco_cfg(tmp_path, synthetic_coco, "quant=minmax", f"stage={stage}", *SMALL), out)
    assert (out / "FAILED").is_file() and not (out / "quantized.ckpt").exists()


def test_a_detector_without_weights_names_the_checkpoint_setting(synthetic_coco, tmp_path):
    with pytest.raises(ValueError, match=r"no float weights for cascade_mask_rcnn_swin_t on coco: pass "
                                         r"model\.checkpoint=<an mmdet 3 or Swin-repository checkpoint"):
        run(coco_cfg(tmp_path, synthetic_coco, "quant=minmax", *SMALL), tmp_path / "out")


@needs_mmdet
def test_finetune_trains_the_quantized_backbone_with_detector_losses_and_feature_distillation(
        synthetic_coco, random_checkpoint, tmp_path, one_thread):
    """Quantization-aware finetuning of the detector: mmdet's losses plus backbone feature distillation,
    one epoch on 4 of the 5 generated training images (one held out for the validation loop)."""
    out = tmp_path / "ft"
    row = run(coco_cfg(tmp_path, synthetic_coco, "quant=minmax", "quant.w_bits=4", "quant.a_bits=4",
                       f"model.checkpoint={random_checkpoint}", "quant.finetune.epochs=1", "quant.finetune.val_samples=1",
                       "quant.finetune.batch_size=2", "quant.finetune.lr=1e-3", *SMALL), out)
    check_row(row, out, 5, "minmax")
    assert row["finetune_epochs"] == 1 and row["finetune_trained"]["steps"] > 0
    assert row["finetune_val_feature"] > 0 and row["finetune_val_task"] > 0  # both terms reach the validation loop
    assert "kd" not in "".join(row)  # detection distils features, not logits
    before = torch.load(out / "finetune" / "start.ckpt", weights_only=False)["state_dict"]  # the PTQ model
    after = torch.load(out / "quantized.ckpt", weights_only=False)["state_dict"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("backbone.") and "quantizer" in k for k in changed)  # only backbone grids
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/feature" in header and "train/task" in header


@needs_mmdet
@pytest.mark.slow
def test_isvit_reconstruction_raises_backbone_sqnr(coco_mini_root, random_checkpoint, tmp_path, one_thread):
    """quant=isvit on the random detector's 16 backbone units, calibrated and reconstructed on 4 coco-mini
    images in batches of 2 padded to two sizes (96x160 and 128x160): the same run once stopped after
    calibration and once complete. Every unit caches both sizes, and the reconstruction raises the
    backbone's SQNR on every output level of the calibration batches by more than 1 dB. Measured (seeded,
    strides 4 / 8 / 16 / 32): before 24.6 / 15.1 / 11.0 / 9.5 dB, after 26.0 / 17.5 / 13.7 / 12.2 dB."""
    import copy

    import vitq
    from vitq.tasks.coco import CocoTask, backbone_sqnr, build_detector, load_detector_checkpoint

    common = ["quant=isvit", f"model.checkpoint={random_checkpoint}", *SMALL, "quant.iters=4",
              "quant.recon_batch_size=2", "quant.calib.num_samples=4", "quant.calib.batch_size=2"]
    calibrated, out = tmp_path / "calibrated", tmp_path / "out"
    run(coco_cfg(tmp_path, coco_mini_root, *common, "stage=calibrate"), calibrated)
    cfg = coco_cfg(tmp_path, coco_mini_root, *common)
    row = run(cfg, out)
    check_row(row, out, 15, "isvit")
    stored = json.loads((out / "results.json").read_text())
    units = stored["reconstruct_units"]
    assert [u["pass"] for u in units] == [0] * 16 + [1] * 16 and units[0]["name"] == "backbone.patch_embed"
    assert all(u["groups"] == 2 and u["seconds"] > 0 and u["peak_mib"] > 0 for u in units)  # both padded sizes
    assert stored["reconstruct_seconds"] > 0 and stored["reconstruct_iters"] == [4, 4]

    task = CocoTask(OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.model, resolve=True))
    batches = list(task.calib_loader(4, 2, 0))  # the engine's calibration batches (quant.calib.seed 0)
    fp = load_detector_checkpoint(build_detector(OmegaConf.to_container(cfg.model, resolve=True)), random_checkpoint)
    levels = {}
    for name, folder in (("before", calibrated), ("after", out)):
        quantized = vitq.load_quantized(copy.deepcopy(fp), folder / "quantized.ckpt").eval()
        levels[name] = backbone_sqnr(fp, quantized, batches)
    before, after = levels["before"], levels["after"]
    assert len(before) == len(after) == 4
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)


@needs_mmdet
def test_two_process_ddp_run_through_train_py(synthetic_coco, random_checkpoint, tmp_path):
    """Lightning's DDP starts its second process as a fresh `python train.py ...`: both processes get vitq's
    kernels (under mmcv-lite) before mmdet imports mmcv.ops, and the run ends with every image evaluated."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    overrides = ["task=coco", f"task.root={synthetic_coco}", "task.img_size=96", "task.batch_size=1",
                 "task.num_workers=0", "logger=csv", "quant=minmax", f"model.checkpoint={random_checkpoint}",
                 "quant.calib.num_samples=2", "quant.calib.batch_size=1", f"paths.cache_dir={tmp_path / 'cache'}",
                 f"paths.output_root={tmp_path / 'out'}", "trainer=ddp", "trainer.accelerator=cpu",
                 "trainer.devices=2", *SMALL]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "train.py"), *overrides], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    (out,) = [p.parent for p in (tmp_path / "out").glob("*/results.json")]
    row = json.loads((out / "results.json").read_text())
    assert row["eval_samples"] == 5 and row["task"] == "coco" and 0 <= row["quant_box_AP"] <= 100
