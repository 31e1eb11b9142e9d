"""Two-process data-parallel runs of train.py on CPU equal a one-process run over the same samples.

The one-process run trains the float model and caches it; the DDP run (gloo, W&B offline) loads it, so
both calibrate the same model. Calibration (72 images in batches of 16: 5 batches, 3 and 2 per rank) and
evaluation (100 images in batches of 32: 64 and 36 per rank) split unevenly, so a padded sampler would
show as repeated samples. Both runs use one thread per process (OMP_NUM_THREADS=1), as Lightning would
otherwise pick a different thread count per process count; with that, the results are bit for bit equal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.kwargs.embed_dim=32", "model.kwargs.depth=1", "model.kwargs.num_heads=2", "task.fit.epochs=1",
        "task.train_limit=256", "task.eval_limit=100", "task.batch_size=32", "quant.calib.num_samples=72",
        "quant.calib.batch_size=16"]


def _train(tmp_path: Path, name: str, *overrides: str) -> tuple[Path, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, *overrides, f"paths.cache_dir={tmp_path / 'cache'}",
         f"paths.output_root={tmp_path / name}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "Error executing job" not in output, output[-3000:]
    runs = list((tmp_path / name).glob("*/results.json"))
    assert len(runs) == 1 and not list((tmp_path / name).glob("*/FAILED")), output[-3000:]
    return runs[0].parent, output


@pytest.mark.parametrize("recipe", ["fqvit", pytest.param("repq", marks=pytest.mark.slow),
                                    pytest.param("ema", marks=pytest.mark.slow)])
def test_ddp_run_equals_one_process_run(tmp_path, recipe):
    one, _ = _train(tmp_path, "one", f"quant={recipe}", "logger=csv")
    two, _ = _train(tmp_path, "two", f"quant={recipe}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")

    a = torch.load(one / "quantized.ckpt", weights_only=False)["state_dict"]
    b = torch.load(two / "quantized.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and any(k.endswith(".scale") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"2-process calibration differs from 1-process in {differ[:5]}"

    row_one, row_two = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert row_two["float_source"].startswith("cached ")  # the same float model as the one-process run
    assert row_two["eval_samples"] == 100  # 64 + 36: none lost, none repeated by padding
    for key in ("fp_top1", "quant_top1", "delta_top1", "delta_top1_ci", "quant_top5"):
        assert row_two[key] == row_one[key], key  # outcomes pair sample by sample, as in one process
    assert (two / "wandb").is_dir()  # every rank finished W&B cleanly (a crash there fails the run above)
