"""End-to-end runs of the engine on a tiny MNIST config, and the start-up validation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from vitq.engine.run import run

from tiny import CONF, ROOT, tiny_cfg


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(tmp)
    out = tmp / "out"
    row = run(cfg, out)
    return tmp, out, row


@pytest.fixture(scope="module")
def fqvit_run(first_run):
    """The FQ-ViT recipe with integer kernels on the cached float model of `first_run`."""
    tmp, _, _ = first_run
    cfg = tiny_cfg(tmp, "quant=fqvit", "quant.integer=true", "quant.calib.num_samples=64",
                   "quant.calib.batch_size=32")
    out = tmp / "out-fqvit"
    return out, run(cfg, out)


IMAGE = 100 / 256  # one of the 256 evaluation images, in % top-1


def test_end_to_end_writes_results_checkpoint_and_csv(first_run):
    tmp, out, row = first_run
    assert (out / "quantized.ckpt").is_file()
    assert not (out / "FAILED").exists()
    stored = json.loads((out / "results.json").read_text())
    assert stored["recipe"] == "minmax" and stored["scope"] == "matmul"
    assert (stored["w_bits"], stored["a_bits"], stored["attn_bits"]) == (8, 8, 8)
    # measured (seeded): float 39/256 = 15.23% top-1 and 148/256 top-5 after one epoch on 512 images;
    # W8A8 changes no prediction (quant 39/256, top-5 148/256). Bounds: 2 images.
    assert stored["fp_top1"] == pytest.approx(15.234375, abs=2 * IMAGE)
    assert stored["fp_top5"] == pytest.approx(57.8125, abs=2 * IMAGE)
    assert stored["quant_top5"] == pytest.approx(57.8125, abs=2 * IMAGE)
    assert abs(stored["delta_top1"]) <= 2 * IMAGE  # W8A8 on a 1-block model stays close to float
    assert stored["delta_top1"] == pytest.approx(stored["quant_top1"] - stored["fp_top1"], abs=1e-9)
    assert stored == json.loads(json.dumps(row))  # results.json is the returned row
    # the CSV log holds the same numbers (in %)
    header, values = (out / "csv" / "metrics.csv").read_text().splitlines()[:2]
    logged = dict(zip(header.split(","), values.split(",")))
    for key in ("fp/top1", "fp/top5", "quant/top1", "quant/top5", "quant/delta_top1"):
        assert float(logged[key]) == pytest.approx(stored[key.replace("/", "_").replace("quant_delta", "delta")])
    # one row per quant point of the 1-block ViT: 6 Linear/Conv2d layers (patch_embed.proj, qkv, proj, fc1,
    # fc2, head) give 6 weights + 6 inputs + 4 outputs (not qkv's: q, k, v are its operands; not fc1's: it is
    # quantized after GELU as fc2's input); q, k, v; softmax in and out; norm1, norm2, norm: 24.
    # The matmul scope quantizes the 6 + 6 + 3 + 1 = 16 that enter a matrix product.
    points = (out / "points.csv").read_text().splitlines()
    assert points[0].startswith("name,kind,mode") and len(points) == 1 + 24
    assert sum(line.split(",")[2] == "quant" for line in points[1:]) == 16


def test_float_model_and_float_metrics_are_cached(first_run):
    tmp, _, row = first_run
    cached = list((tmp / "cache").glob("vit_mnist-mnist-*.pt"))
    assert len(cached) == 1
    assert list((tmp / "cache").glob("*.fp-outcomes.json"))
    again = run(tiny_cfg(tmp, "quant=percentile"), tmp / "out2")
    assert "cached" in again["float_source"]
    assert again["fp_top1"] == row["fp_top1"]


def test_checkpoint_round_trip_reproduces_metrics_exactly(first_run):
    tmp, out, row = first_run
    cfg = tiny_cfg(tmp, "stage=test", f"quant.from_checkpoint={out / 'quantized.ckpt'}")
    again = run(cfg, tmp / "out-test")
    assert again["quant_top1"] == row["quant_top1"]
    assert again["quant_top5"] == row["quant_top5"]


def test_every_config_file_composes():
    groups = {g: sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml"))
              for g in ("model", "task", "trainer", "logger")}
    groups["quant"] = sorted(p.stem for p in (ROOT / "src" / "vitq" / "conf" / "quant").glob("*.yaml"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for group, options in groups.items():
            assert options, group
            for opt in options:
                overrides = [f"{group}={opt}"]
                if group == "task" and opt != "mnist":
                    overrides.append("task.root=/data")
                cfg = compose("config", overrides=overrides)
                OmegaConf.to_container(cfg, resolve=True)
                from vitq.engine.config import validate

                validate(cfg)
        for exp in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
            cfg = compose("config", overrides=[f"experiment={exp.stem}", "task.root=/data"])
            validate(cfg)
            assert cfg.quant.name and cfg.task.name in ("imagenet", "coco"), exp.name


@pytest.mark.parametrize(
    "override,message",
    [
        ("quant.w_bits=1", "between 2 and 16"),
        ("quant.a_bits=17", "between 2 and 16"),
        ("quant.attn_bits=0", "set it with quant.attn_bits=8"),
        ("+quant.bogus=1", "Valid keys of 'quant'"),
        ("+quant.overrides=[{pattern: 'nope.*', bits: 8}]", "matches no quant point"),
        ("stage=nonsense", "stage="),
        ("stage=test", "quant.from_checkpoint"),
        ("quant=fqvit quant.scope=matmul quant.integer=true", "integer-ready FQ-ViT setting"),
        ("quant.method=nonexistent", "unknown method"),
        ("+trainer.bogus=1", "not a lightning.Trainer argument"),
        ("quant.observer=bogus", "unknown observer"),
        ("quant.calib.num_samples=100000", "num_samples"),
    ],
)
def test_bad_config_fails_at_start_with_the_fix(tmp_path, override, message):
    if override.startswith("+quant.overrides"):
        cfg = tiny_cfg(tmp_path)
        with open_dict(cfg):
            cfg.quant.overrides = [{"pattern": "nope.*", "bits": 8}]
    else:
        cfg = tiny_cfg(tmp_path, *override.split())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run(cfg, out)
    assert (out / "FAILED").is_file()
    assert not (out / "results.json").exists() and not (out / "quantized.ckpt").exists()


def test_missing_data_root_and_bad_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        run(tiny_cfg(tmp_path, "task=cifar10", f"task.root={tmp_path / 'does-not-exist'}"), tmp_path / "a")
    wrong = tmp_path / "wrong.pt"
    import torch

    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, wrong)
    with pytest.raises(ValueError, match="does not fit the architecture"):
        run(tiny_cfg(tmp_path, f"model.checkpoint={wrong}"), tmp_path / "b")


def test_cli_unknown_group_option_lists_choices(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "quant=nonexistent",
                           f"paths.output_root={tmp_path}"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert "nonexistent" in proc.stderr and "minmax" in proc.stderr


def test_fqvit_integer_run(first_run, fqvit_run):
    """The FQ-ViT recipe end to end: full scope, PTF + LIS, integer kernels, LayerNorm range plot."""
    _, _, row = first_run
    out, got = fqvit_run
    assert got["scope"] == "full" and got["attn_bits"] == 4
    assert got["setting"] == "W8/A8/Attn4-log2 full +ptf +embed integer:exact"
    assert got["fp_top1"] == row["fp_top1"]  # same cached float model and metrics
    # measured: quant top-1 39/256 = 15.23%, delta +0.00 [-3.12, +2.73] on the barely trained float model
    # (27/256 before FQ-ViT's embedding points, last-batch PTF search and LIS during calibration)
    assert got["quant_top1"] == pytest.approx(15.234375, abs=2 * IMAGE)
    assert -2.0 < got["delta_top1"] < 2.0
    assert (out / "layernorm_ranges.png").stat().st_size > 10_000
    ranges = json.loads((out / "layernorm_ranges.json").read_text())
    assert {r["name"] for r in ranges} >= {"blocks.0.norm1", "blocks.0.norm2", "norm"}
    assert all(r["max_range"] >= r["median_range"] > 0 for r in ranges)


@pytest.mark.parametrize("scope", ["matmul", "full"])
def test_fp32_recipe_quantizes_nothing(scope):
    from vitq.engine.config import validate

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        recipe = validate(compose("config", overrides=["quant=fp32", f"quant.scope={scope}"])).recipe
    assert recipe.specs == {}


def test_fqvit_checkpoint_evaluates_with_its_own_float_model_and_integer_kernels(first_run, fqvit_run):
    tmp, _, _ = first_run
    out, _ = fqvit_run
    saved = json.loads((out / "results.json").read_text())
    cfg = tiny_cfg(tmp, "quant=fqvit", "stage=test", f"quant.from_checkpoint={out / 'quantized.ckpt'}")
    again = run(cfg, tmp / "out-fqvit-test")
    assert again["setting"] == saved["setting"]  # integer kernels restored from the checkpoint
    assert again["calib_samples"] == saved["calib_samples"] == 64
    assert (again["quant_top1"], again["fp_top1"]) == (saved["quant_top1"], saved["fp_top1"])
    with pytest.raises(ValueError, match="made with model=vit_mnist"):
        run(tiny_cfg(tmp, "model=vit_cifar", "stage=test", f"quant.from_checkpoint={out / 'quantized.ckpt'}"),
            tmp / "out-wrong")


def test_imagefolder_task_uses_the_model_data_config_and_trains(tmp_path):
    """ImageNet-style path: transforms from timm's data config, then a full run on a generated folder."""
    from PIL import Image

    rng = __import__("numpy").random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype="uint8")).save(folder / f"{i}.png")
    cfg = tiny_cfg(tmp_path, "task=imagenet", f"task.root={tmp_path / 'data'}", "task.num_workers=0",
                   "task.batch_size=8", "task.fit.epochs=1", "model.kwargs.img_size=32", "model.kwargs.patch_size=8",
                   "quant.calib.num_samples=8", "quant.calib.batch_size=4")
    row = run(cfg, tmp_path / "out")
    assert row["task"] == "imagenet" and (row["eval_samples"], row["calib_samples"]) == (16, 8)
    # 16 evaluation images (6.25% each): measured float 12/16 = 75%, quantized 11/16 = 68.75%; bounds 1 image
    assert row["fp_top1"] == pytest.approx(75.0, abs=6.25)
    assert row["quant_top1"] == pytest.approx(68.75, abs=6.25)
    lo, hi = row["delta_top1_ci"]  # the paired bootstrap interval holds the measured difference
    assert lo <= row["delta_top1"] == row["quant_top1"] - row["fp_top1"] <= hi
    assert (tmp_path / "out" / "quantized.ckpt").is_file()


@pytest.mark.parametrize("overrides,columns", [
    pytest.param(["quant=liu21", "quant.mixed_precision=true", "quant.candidates=6", "quant.rounds=3",
                  "quant.search_samples=16"], ("bit_map", "avg_block_bits"), marks=pytest.mark.slow),
    (["quant=minmax", "quant.noisy=true", "quant.noisy_candidates=11"], ("noisy_layers", "noisy_max_steps")),
])
def test_method_columns_reach_the_row_the_log_and_a_reload(first_run, overrides, columns):
    """Liu et al.'s bit map and NoisyQuant's noise: in results.json and the CSV log, and reproduced
    from the checkpoint."""
    tmp, _, _ = first_run
    out = tmp / f"out-{overrides[0].split('=')[1]}"
    row = run(tiny_cfg(tmp, *overrides), out)
    assert all(row[c] is not None for c in columns)
    logged = (out / "csv" / "hparams.yaml").read_text()
    assert all(f"method/{c}" in logged for c in columns)
    again = run(tiny_cfg(tmp, *overrides, "stage=test", f"quant.from_checkpoint={out / 'quantized.ckpt'}"),
                tmp / f"{out.name}-test")
    assert again["quant_top1"] == row["quant_top1"] and all(again[c] == row[c] for c in columns)


def test_validate_returns_the_typed_settings_the_stages_read():
    from vitq.engine.config import validate
    from vitq.engine.schema import CalibConf

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        run = validate(compose("config", overrides=["quant=minmax", "quant.calib.num_samples=64", "seed=3",
                                                    "quant.finetune.epochs=2", "quant.finetune.lr=0.01"]))
    assert run.calib == CalibConf(num_samples=64, batch_size=32, seed=0)
    assert (run.finetune.epochs, run.finetune.lr, run.finetune.val_samples) == (2, 0.01, 500)
    assert (run.seed, run.stage, run.from_checkpoint) == (3, "all", None)
    assert run.model["name"] == "vit_mnist" and run.task["name"] == "mnist" and run.recipe.name == "minmax"
    assert run.meta() == {"model": run.model, "task": run.task, "quant": run.quant}
    assert run.quant["calib"] == {"num_samples": 64, "batch_size": 32, "seed": 0}  # resolved, plain data
    assert type(run.quant) is dict and type(run.quant["calib"]) is dict
