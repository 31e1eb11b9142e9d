"""The `reconstruct` stage: through Lightning on one process, under two-process DDP (gloo), and end to end
in the engine with a checkpoint that keeps the true float baseline."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.multiprocessing as mp

import vitq
from vitq.engine.reconstruct import lightning_fit
from vitq.engine.run import run
from vitq.quant.reconstruct import ReconstructOptions

from tiny import tiny_cfg

VIT = dict(model_name="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
           num_classes=4)
OPTIONS = dict(iters=6, batch_size=8, adaround=True, lsq=True, drop_prob=0.5, input_source="mix", progress=False)


def _model_and_data(two_sizes: bool = False):
    """A W4A4 ViT calibrated on two batches of 16 images: both 16x16, or (`two_sizes`, a ViT taking any image
    size) 16x16 and 16x24, so the patch embedding and the block cache two input sizes."""
    torch.manual_seed(0)
    fp = timm.create_model(**VIT, dynamic_img_size=two_sizes).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 16, 16, generator=g)
    batches = list(x.split(16))
    if two_sizes:
        batches[1] = torch.randn(16, 3, 16, 24, generator=g)
    q = vitq.quantize(copy.deepcopy(fp), vitq.recipe("minmax", w_bits=4, a_bits=4))
    vitq.calibrate(q, lambda m: [m(b) for b in batches], sync=False)
    return fp, q, batches


def _trainer_factory(**fixed):
    def make(**kwargs):
        return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, **fixed, **kwargs)
    return make


def test_lightning_fit_matches_the_plain_loop():
    """Same seeds, same steps, same optimizer: one Lightning process ends where the plain loop ends."""
    fp, q1, batches = _model_and_data()
    q2 = copy.deepcopy(q1)
    options = ReconstructOptions(**{**OPTIONS, "drop_prob": 0.0, "input_source": "float"})
    vitq.reconstruct(q1, fp, batches, lambda m, b: m(b), options)
    vitq.reconstruct(q2, fp, batches, lambda m, b: m(b), options, fit=lightning_fit(_trainer_factory(devices=1)))
    for (k, a), b in zip(q1.state_dict().items(), q2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def _ddp_worker(rank: int, world: int, port: int, out: str, two_sizes: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      NODE_RANK="0", GLOBAL_RANK=str(rank))
    torch.set_num_threads(1)
    fp, q, batches = _model_and_data(two_sizes)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    reports = vitq.reconstruct(q, fp, batches, lambda m, b: m(b), ReconstructOptions(**OPTIONS),
                               fit=lightning_fit(_trainer_factory(devices=world, strategy="ddp")))
    torch.save({"state": q.state_dict(), "before": before, "units": [r.name for r in reports],
                "groups": [r.groups for r in reports]}, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("two_sizes", [False, True], ids=["one-size", "two-sizes"])
def test_two_process_ddp_ends_with_identical_parameters(two_sizes, tmp_path, free_port):
    """Each rank draws different mini-batches (and drop masks; with two image sizes, from either size's
    group); DDP averages the gradients, so every trained tensor (rounding-baked weights, LSQ steps) ends
    identical on both ranks, and differs from the start."""
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), two_sizes), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2))
    assert r0["units"] == r1["units"] == ["patch_embed", "blocks.0", "head"]
    assert r0["groups"] == r1["groups"] == ([2, 2, 1] if two_sizes else [1, 1, 1])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    changed = [k for k in r0["state"] if not torch.equal(r0["state"][k], r0["before"][k])]
    assert any(k.endswith("attn.qkv.weight") for k in changed)  # baked rounding
    assert any(k.endswith("input_quantizer.quantizer.scale") for k in changed)  # learned steps


def test_engine_runs_isvit_and_the_checkpoint_keeps_the_float_baseline(tmp_path):
    cfg = tiny_cfg(tmp_path, "quant=isvit", "quant.iters=4", "quant.recon_batch_size=16",
                   "quant.calib.num_samples=32", "quant.calib.batch_size=16")
    out = tmp_path / "out"
    row = run(cfg, out)
    units = row["reconstruct_units"]
    # SOS stage 1 tunes the units with quantized activations: the block and the head (the image input stays
    # float, as the code's, so patch_embed has nothing to tune until stage 3 quantizes its weight)
    assert [u["pass"] for u in units] == [0, 0, 1, 1, 1]
    assert [u["name"] for u in units] == ["blocks.0", "head", "patch_embed", "blocks.0", "head"]
    assert row["reconstruct_passes"] == 2 and row["reconstruct_iters"] == [4, 4]
    assert all(u["seconds"] > 0 and u["peak_mib"] > 0 and u["cache_mib"] > 0 for u in units)
    assert row["reconstruct_seconds"] >= sum(u["seconds"] for u in units) * 0.99
    assert json.loads((out / "results.json").read_text())["reconstruct_units"] == units
    ckpt = vitq.quant.read_quantized(out / "quantized.ckpt")
    assert "float_state_dict" in ckpt
    tuned = [k for k, v in ckpt["float_state_dict"].items() if k in ckpt["state_dict"]
             and not torch.equal(v, ckpt["state_dict"][k])]
    assert any(k.endswith("mlp.fc2.weight") for k in tuned)  # weights changed, the float ones kept
    again = run(tiny_cfg(tmp_path, "stage=test", f"quant.from_checkpoint={out / 'quantized.ckpt'}"), tmp_path / "out2")
    assert again["fp_top1"] == row["fp_top1"] and again["fp_top5"] == row["fp_top5"]
    assert again["quant_top1"] == row["quant_top1"] and again["quant_top5"] == row["quant_top5"]
