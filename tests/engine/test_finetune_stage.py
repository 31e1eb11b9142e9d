"""The `finetune` stage in the engine: results, checkpoints, resume after an interruption, a saved model
finetuned later, two-process DDP, and bad settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitq.engine.lifecycle import RunInterrupted
from vitq.engine.run import run
from vitq.engine.tasks import distillation_kl, hold_out

from tiny import ROOT, csv_rows, tiny_cfg

FT = ["quant.w_bits=4", "quant.a_bits=4", "quant.finetune.epochs=3", "quant.finetune.val_samples=64",
      "quant.finetune.batch_size=32", "quant.finetune.weights=true", "quant.finetune.lr=1e-3"]


def _state(out) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return torch.load(out / "quantized.ckpt", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    out = tmp / "whole"
    return tmp, out, run(tiny_cfg(tmp, *FT), out)


def test_finetune_trains_the_quantizers_and_weights_and_records_it(finetuned):
    tmp, out, row = finetuned
    ptq = run(tiny_cfg(tmp, *FT[:2]), tmp / "ptq")  # the same calibration without finetuning
    assert row["setting"] == "W4/A4 matmul +finetune 3 ep" and row["finetune_epochs"] == 3
    assert row["finetune_trained"]["steps"] > 0 and row["finetune_trained"]["zero_points"] > 0
    assert row["finetune_trained"]["weights"] > 0
    assert {"finetune_val_loss", "finetune_val_kd", "finetune_val_task", "finetune_val_top1"} <= set(row)
    assert row["fp_top1"] == ptq["fp_top1"]  # the float baseline stays the float model
    a, b = _state(out), _state(tmp / "ptq")
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(k.endswith("weight_quantizer.quantizer.scale") for k in changed)
    assert any(k.endswith("input_quantizer.quantizer.scale") for k in changed)
    assert any(k.endswith("qkv.weight") for k in changed)
    assert all(float(v) == round(float(v)) for k, v in a.items() if k.endswith("zero_point") for v in v.reshape(-1))
    assert (out / "finetune" / "last.ckpt").is_file() and (out / "finetune" / "start.ckpt").is_file()
    assert "val/loss" in (out / "csv" / "metrics.csv").read_text().splitlines()[0]


def test_checkpoint_of_a_finetuned_model_evaluates_the_same_against_the_true_float_model(finetuned):
    tmp, out, row = finetuned
    again = run(tiny_cfg(tmp, "stage=test", f"quant.from_checkpoint={out / 'quantized.ckpt'}"), tmp / "reload")
    for key in ("fp_top1", "quant_top1", "quant_top5", "delta_top1_ci"):
        assert again[key] == row[key], key


def test_interrupted_finetune_resumes_from_last_and_ends_as_an_uninterrupted_run(finetuned):
    """SIGTERM at the start of epoch 3 of 3 (after epoch 2's checkpoint); the same command with
    quant.finetune.ckpt_path=last in the same directory loads the saved start model, skips calibration,
    runs epoch 3 and ends with the uninterrupted run's model and results, bit for bit."""
    tmp, whole, row = finetuned
    out = tmp / "resumed"
    with pytest.raises(RunInterrupted):
        run(tiny_cfg(tmp, *FT, "+callbacks.stop._target_=tiny.StopFinetuneAt", "+callbacks.stop.epoch=2"), out)
    assert (out / "FAILED").read_text().startswith("interrupted (SIGTERM)")
    assert (out / "finetune" / "last.ckpt").is_file() and not (out / "results.json").exists()
    assert torch.load(out / "finetune" / "last.ckpt", weights_only=False)["epoch"] == 1  # epochs 0 and 1 done
    first = csv_rows(out / "csv" / "metrics.csv")

    resumed = run(tiny_cfg(tmp, *FT, "quant.finetune.ckpt_path=last"), out)
    final = csv_rows(out / "csv" / "metrics.csv")  # the first attempt's rows are kept, before the new ones
    assert first and final[: len(first)] == first and len(final) > len(first)
    assert resumed["finetune_resumed"] is True and not (out / "FAILED").exists()
    a, b = _state(whole), _state(out)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    for key in ("fp_top1", "quant_top1", "quant_top5", "delta_top1_ci", "finetune_val_loss"):
        assert resumed[key] == row[key], key


def test_a_saved_ptq_model_can_be_finetuned_later(finetuned):
    tmp, _, _ = finetuned
    ptq = tmp / "ptq"  # written by the first test of this module, or made here
    if not (ptq / "quantized.ckpt").is_file():
        run(tiny_cfg(tmp, *FT[:2]), ptq)
    row = run(tiny_cfg(tmp, "quant.finetune.epochs=1", "quant.finetune.val_samples=0",
                       f"quant.from_checkpoint={ptq / 'quantized.ckpt'}"), tmp / "later")
    assert row["setting"].endswith("+finetune 1 ep") and (tmp / "later" / "quantized.ckpt").is_file()
    assert not any(k.startswith("finetune_val") for k in row)  # no held-out images: no validation loop


@pytest.mark.parametrize("override, message", [
    (["stage=test", "quant.from_checkpoint=x.ckpt"], "stage=test only evaluates"),
    (["quant.finetune.lr=0"], "quant.finetune.lr must be > 0"),
    (["quant.finetune.val_samples=100000"],
     "quant.finetune.val_samples=100000 must be between 0 and 511: the training split of task=mnist holds 512"),
    (["quant.finetune.ckpt_path=/nonexistent/last.ckpt"], "does not exist"),
    (["quant.finetune.epoch=2"], "finetune.epoch"),
])
def test_bad_finetune_settings_fail_at_start_with_the_fix(tmp_path, override, message):
    with pytest.raises(Exception, match=message):
        run(tiny_cfg(tmp_path, "quant.finetune.epochs=1", *override), tmp_path / "out")


def test_two_process_ddp_finetune_ends_identical_on_both_ranks(finetuned, tmp_path):
    """train.py under 2-process gloo DDP: QDrop reconstruction, then finetuning; the stages check that
    every parameter is identical on both processes (a difference fails the run) and say so. Every rank runs
    under the simulated NCCL device rule (nccl_rule.py): each tensor vitq hands a collective in calibration,
    reconstruction, finetuning and evaluation (after Lightning moved the model back to the CPU) is staged on
    the backend's device."""
    tmp, _, _ = finetuned
    rule_log = tmp_path / "nccl-rule"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "VITQ_NCCL_RULE_LOG": str(rule_log)}
    cfg = tiny_cfg(tmp)  # the cached float model of this module
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent / "nccl_train.py"), "model.kwargs.embed_dim=32", "model.kwargs.depth=1",
         "model.kwargs.num_heads=2", "task.fit.epochs=1", "task.train_limit=512", "task.eval_limit=256",
         "task.batch_size=64", "quant=qdrop", "quant.iters=4", "quant.calib.num_samples=64",
         "quant.calib.batch_size=32", "quant.recon_batch_size=16", "logger=csv",
         "quant.finetune.epochs=1", "quant.finetune.val_samples=64", "quant.finetune.weights=true",
         "quant.finetune.batch_size=32",
         "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"paths.cache_dir={cfg.paths.cache_dir}",
         f"paths.output_root={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "every parameter is identical on the 2 processes" in output, output[-3000:]
    (result,) = tmp_path.glob("*/results.json")
    row = json.loads(result.read_text())
    assert row["finetune_epochs"] == 1 and row["reconstruct_passes"] >= 1
    logs = {p.name: p.read_text() for p in rule_log.glob("rank*.txt")}
    assert logs == {"rank0.txt": "", "rank1.txt": ""}, logs


def test_hold_out_draws_disjoint_sorted_splits_by_seed_and_distillation_kl_is_the_tempered_kl():
    rest, held = hold_out(10, 3, 0, "ten samples")
    assert len(held) == 3 and sorted(rest + held) == list(range(10)) and rest == sorted(rest) and held == sorted(held)
    assert hold_out(10, 3, 0, "x") == (rest, held) and hold_out(10, 3, 1, "x") != (rest, held)
    with pytest.raises(ValueError, match="val_samples=10 must be between 0 and 9: ten samples holds 10"):
        hold_out(10, 10, 0, "ten samples")
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    p, log_q = torch.softmax(teacher / 2, -1), torch.log_softmax(student / 2, -1)
    by_hand = (p * (p.log() - log_q)).sum(-1).mean() * 4  # KL(p || q) at T=2, times T^2
    assert torch.allclose(distillation_kl(student, teacher, 2.0), by_hand, atol=1e-6)
    assert float(distillation_kl(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_the_recipe_files_finetune_block_has_every_setting_at_its_schema_default():
    """`base/uniform.yaml` lists the keys (so `quant.finetune.<key>=` works on the command line); its values
    are the schema's defaults, so a recipe file and a config without the block mean the same."""
    from dataclasses import asdict

    import yaml

    from vitq.engine.config import FinetuneConf

    block = yaml.safe_load((ROOT / "src/vitq/conf/quant/base/uniform.yaml").read_text())["finetune"]
    assert block == asdict(FinetuneConf())
