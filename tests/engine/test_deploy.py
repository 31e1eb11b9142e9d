"""stage=analyze and stage=export through the engine, and analyze.apply keeping the top points wider."""
from __future__ import annotations

import csv
import json

import pytest

import vitq
from vitq.engine.config import validate
from vitq.engine.run import run
from vitq.export import ExportError

from tiny import tiny_cfg

ONE_BLOCK_LAYERS = 1 + 4 + 1  # patch embedding, qkv / proj / fc1 / fc2, head


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy")  # the tiny float model is trained once for this module


def test_export_stage_writes_a_checked_int8_file_instead_of_testing(cache):
    out = cache / "export"
    result = run(tiny_cfg(cache, "quant=int8_trt", "stage=export", "export.check_samples=100"), out)
    assert result["stages"] == ["float", "calibrate", "export"]
    assert (out / "model.onnx").is_file() and (out / "model.fp32.onnx").is_file() and (out / "quantized.ckpt").is_file()
    assert not (out / "results.json").exists()  # no test stage
    saved = json.loads((out / "export.json").read_text())
    assert saved["images"] == 100 and saved["top1_agreement"] >= 99.0
    assert saved["structure_problems"] == [] and saved["quantized_compute_nodes"] == ONE_BLOCK_LAYERS
    assert saved["int8_weights"] == ONE_BLOCK_LAYERS and saved["size_ratio"] < 0.8  # weights as 8-bit codes (a one-block model: graph overhead dominates)

    # quant=fqvit (the config's default, log2 attention) does not matter: the checkpoint's recipe is exported
    again = run(tiny_cfg(cache, "quant=fqvit", "stage=export", f"quant.from_checkpoint={out / 'quantized.ckpt'}",
                         "export.check_samples=100", "export.float_export=false"), cache / "export-again")
    assert again["stages"] == ["float", "load", "export"]  # the saved model, not calibrated again
    assert again["top1_agreement"] == saved["top1_agreement"] and again["sqnr_db"] == saved["sqnr_db"]
    assert not (cache / "export-again" / "model.fp32.onnx").exists()


def test_export_of_a_non_uniform_grid_stops_and_writes_no_file(cache):
    out = cache / "export-fqvit"
    with pytest.raises(ExportError, match="stage=export cannot export this recipe(.|\n)*quant.lis=false"):
        run(tiny_cfg(cache, "quant=fqvit", "quant.calib.num_samples=64", "quant.calib.batch_size=32",
                     "stage=export"), out)
    assert (out / "FAILED").is_file()  # at start-up, before calibrating: no checkpoint, no file
    assert not (out / "model.onnx").exists() and not (out / "quantized.ckpt").exists()


def test_export_checks_what_calibration_decides_at_the_end(cache):
    """Integer kernels are switched on after calibration: the export stage itself names them."""
    out = cache / "export-integer"
    with pytest.raises(ExportError, match="quant.integer=false"):
        run(tiny_cfg(cache, "quant=fqvit", "quant.lis=false", "quant.attn_bits=8", "quant.calib.num_samples=64",
                     "quant.calib.batch_size=32", "stage=export"), out)
    assert not (out / "model.onnx").exists()


def test_analyze_stage_ranks_points_and_its_csv_keeps_them_wider(cache):
    out = cache / "analyze"
    result = run(tiny_cfg(cache, "quant.w_bits=4", "quant.a_bits=4", "stage=analyze", "analyze.samples=64",
                          "analyze.keep=2"), out)
    assert result["stages"] == ["float", "calibrate", "analyze"]
    assert not (out / "results.json").exists()
    with open(out / "sensitivity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    points = [n for n, p in vitq.iter_points(vitq.quantize(_probe(cache), "minmax")) if p.configured]
    assert sorted(r["name"] for r in rows) == sorted(points)  # one row per quantized point
    assert (out / "sensitivity.png").stat().st_size > 5000
    top = [r["name"] for r in sorted(rows, key=lambda r: int(r["rank"]))[:2]]
    summary = json.loads((out / "sensitivity.json").read_text())
    assert summary["top"] == top and summary["split"] == "train" and summary["samples"] == 64

    # analyze.apply: those two points get 8 bits in a later run's recipe, the others keep 4
    settings = validate(tiny_cfg(cache, "quant.w_bits=4", "quant.a_bits=4", f"analyze.apply={out / 'sensitivity.csv'}",
                                 "analyze.keep=2"))
    placed = vitq.quantize(_probe(cache), settings.recipe)
    bits = {n: p.quantizer.bits for n, p in vitq.iter_points(placed) if p.configured}
    assert {n for n, b in bits.items() if b == 8} == set(top)
    assert all(b == 4 for n, b in bits.items() if n not in top)


def test_apply_names_a_missing_csv(cache):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        validate(tiny_cfg(cache, f"analyze.apply={cache / 'nowhere.csv'}"))
    with pytest.raises(ValueError, match="analyze.split must be train or eval"):
        validate(tiny_cfg(cache, "analyze.split=test"))


def test_bad_deployment_settings_fail_at_start_up(cache, tmp_path):
    with pytest.raises(ValueError, match="analyze.keep_bits"):
        validate(tiny_cfg(cache, "analyze.keep_bits=1"))
    with pytest.raises(ExportError, match="opset 30 is not one torch's exporter writes"):
        validate(tiny_cfg(cache, "export.opset=30"))
    with pytest.raises(ExportError, match="opset 12 is too old"):
        validate(tiny_cfg(cache, "export.opset=12"))
    table = tmp_path / "sensitivity.csv"
    table.write_text("rank,name,bits\n1,blocks.0.attn.qkv.input,4\n")
    with pytest.raises(ValueError, match="analyze.apply changes the recipe"):
        validate(tiny_cfg(cache, f"analyze.apply={table}", "quant.from_checkpoint=some.ckpt"))


def _probe(cache):  # noqa: ANN001, ANN202
    """The tiny configuration's float architecture (untrained: only point names and bits are read)."""
    from vitq.engine.tasks import get_task

    settings = validate(tiny_cfg(cache))
    return get_task(settings.task["name"])(settings.task, settings.model).create_model(pretrained=False)
