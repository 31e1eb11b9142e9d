"""Calibration and evaluation over two gloo processes equal one process over the same samples.

Every calibrator (minmax, ema, percentile, omse, quantile) and the fqvit and repq methods calibrate the
MNIST ViT (one block) on two ranks through `vitq.calibrate` with the engine's sharding (whole batches,
uneven: 3 and 2 batches, the last one short). Each rank's whole model state (quantizer parameters and,
after RepQ's fold, the weights) must equal the single-process result bit for bit: both use one thread,
and merging is exact by design (per-batch statistics folded in global batch order, token reservoirs keyed
by global batch). RepQ-ViT's default quantized calibration flow feeds each rank every batch instead (as the
engine does), and must give the same state too. The end-to-end train.py runs are in test_ddp.py.

Both ranks run under the simulated NCCL device rule (nccl_rule.py): every tensor vitq hands to a collective
must have been staged on the backend's device. `test_every_method_calibrates_under_the_nccl_rule` runs the
methods whose searches end in a broadcast from rank 0 (Liu et al., NoisyQuant) and the reconstruction
methods' calibration too.
"""
from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import vitq
from vitq.distributed import BatchShards, check_same_on_ranks, gather_batches, shard_or_replicate, sharded
from vitq.engine.tasks import get_task

import nccl_rule
from tiny import tiny_cfg

CALIB, BATCH, EVAL = 72, 16, 100  # 5 calibration batches (16 x 4 + 8), 4 evaluation batches (32 x 3 + 4)

RECIPES = {  # name -> (recipe, overrides): every calibrator, and both methods
    "minmax": ("minmax", {}),
    "ema": ("ema", {}),
    "percentile": ("percentile", {}),
    # reservoirs smaller than the 1,224 tokens of a point's calibration set, so merging trims them
    "omse": ("omse", {"activation": {"observer_args": {"max_tokens": 200}}}),
    "quantile": ("minmax", {"observer": "quantile", "activation": {"observer_args": {"max_tokens": 200}}}),
    "fqvit": ("fqvit", {}),
    "fqvit_ema": ("fqvit", {"observer": "ema"}),  # PTF around an order-dependent layer calibrator
    "repq": ("repq", {}),  # calib_flow: quantized (every rank feeds the whole set)
    "repq_float": ("repq", {"calib_flow": "float"}),
}


def _setup(cfgs: tuple[dict, dict]):
    """The task, a float model with fixed random weights, and plain (unsharded) loaders."""
    task_cfg, model_cfg = cfgs
    task = get_task("mnist")(task_cfg, model_cfg)
    torch.manual_seed(0)
    model = task.create_model(pretrained=False).eval()
    return task, model, task.calib_loader(CALIB, BATCH, 0), task.test_loader()


def _calibrate_all(task, model, loader, whole) -> dict[str, dict[str, torch.Tensor]]:  # noqa: ANN001
    """Every recipe's calibrated state dict, calibrating over `loader` (sharded when distributed), or over
    `whole` (every batch, on every rank) for a recipe whose calibration flow is quantized or that acts on
    the last batch (FQ-ViT's LIS during calibration: `batches` names it)."""
    out = {}
    for key, (name, overrides) in RECIPES.items():
        recipe = vitq.recipe(name, **overrides)
        qmodel = vitq.quantize(copy.deepcopy(model), recipe)
        module = task.calibration_module(qmodel)
        in_order = recipe.calib_flow != "float" or recipe.method_impl().calibrates_in_order()
        batches = whole if in_order else loader

        def loop(m: torch.nn.Module, module=module, batches=batches) -> None:  # noqa: ANN001
            for i, batch in enumerate(batches):
                module.validation_step(batch, i)

        vitq.calibrate(qmodel, loop, batches=len(whole))
        out[key] = {k: v.clone() for k, v in qmodel.state_dict().items()}
    return out


def _predictions(model: torch.nn.Module, loader: DataLoader) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x).argmax(-1) for x, _ in loader]


def _join(rank: int, world: int, port: int) -> None:
    """One thread, the simulated NCCL device rule, and the gloo group."""
    torch.set_num_threads(1)
    nccl_rule.install()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _worker(rank: int, world: int, port: int, cfgs: tuple[dict, dict], out_dir: str) -> None:
    _join(rank, world, port)
    try:
        task, model, calib, test = _setup(cfgs)
        states = _calibrate_all(task, model, sharded(calib, world, "calibration"), calib)
        test = sharded(test, world, "evaluation")
        predictions = gather_batches(_predictions(model, test))
        try:  # the rank check itself: a difference on one rank fails every rank, naming the tensor
            check_same_on_ranks({"a.scale": torch.ones(3), "b.scale": torch.tensor([1.0, float(rank)])}, "probe")
            caught = None
        except RuntimeError as e:
            caught = str(e)
        torch.save({"states": states, "predictions": torch.cat(predictions), "local": len(test.sampler),
                    "check": caught, "violations": nccl_rule.violations}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_calibration_equals_one_process(tmp_path, free_port, one_thread):
    cfg = tiny_cfg(tmp_path, f"task.eval_limit={EVAL}", "task.batch_size=32")
    cfgs = (OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.model, resolve=True))
    mp.spawn(_worker, args=(2, free_port(), cfgs, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    task, model, calib, test = _setup(cfgs)
    single = _calibrate_all(task, model, calib, calib)
    for key, want in single.items():
        scales = [k for k in want if k.endswith(("scale", "alpha"))]
        assert scales, key
        for r, got in enumerate(ranks):
            assert got["states"][key].keys() == want.keys(), key
            worst = max(float((got["states"][key][k].float() - v.float()).abs().max()) for k, v in want.items())
            print(f"{key}: rank {r} max |2-process - 1-process| over {len(want)} tensors = {worst}")
            for k, v in want.items():  # every scale, zero point, PTF factor and (RepQ) folded weight
                assert torch.equal(got["states"][key][k], v), f"{key}: {k} differs on rank {r}"

    assert [r["violations"] for r in ranks] == [[], []]  # every collective on the backend's device
    assert ranks[0]["check"] is not None and ranks[1]["check"] is not None  # both raise, neither waits
    assert "process 1 differs from process 0 in b.scale" in ranks[1]["check"]

    # evaluation: 64 + 36 samples, none repeated, gathered back in one process's order
    assert [r["local"] for r in ranks] == [64, 36]
    want = torch.cat(_predictions(model, test))
    for r in ranks:
        assert torch.equal(r["predictions"], want)


def test_batch_shards_split_whole_batches_without_padding(monkeypatch):
    seen = []
    for rank in range(3):
        monkeypatch.setattr("vitq.distributed.rank_world", lambda group=None, rank=rank: (rank, 3))
        sampler = BatchShards(23, 4)  # batches 0..5, the last one of 3 samples
        indices = list(sampler)
        assert len(indices) == len(sampler)
        seen.append(indices)
    assert seen[0] == [0, 1, 2, 3, 12, 13, 14, 15] and seen[2] == [8, 9, 10, 11, 20, 21, 22]
    assert sorted(i for s in seen for i in s) == list(range(23))  # every sample once


def test_sharded_refuses_what_cannot_reproduce_one_process():
    data = TensorDataset(torch.zeros(10, 1))
    assert sharded(DataLoader(data, batch_size=4), 1, "x").sampler.__class__.__name__ == "SequentialSampler"
    with pytest.raises(ValueError, match="unshuffled loader with a batch size"):
        sharded(DataLoader(data, batch_size=4, shuffle=True), 2, "the calibration loader")
    with pytest.raises(ValueError, match="make 3 batch\\(es\\), fewer than the 4 processes"):
        sharded(DataLoader(data, batch_size=4), 4, "the calibration loader")
    loader = sharded(DataLoader(data, batch_size=4), 2, "the calibration loader")
    assert isinstance(loader.sampler, BatchShards) and loader.batch_size == 4


METHODS = ("liu21", "noisyquant", "isvit", "qdrop")  # calibration; the others run in the test above
ONE_BATCH = ("minmax", "omse", "ema")  # 32 images in one batch (RepQ-ViT's set) on two processes


def _one_batch(task, model, loader, whole: bool) -> dict[str, dict[str, torch.Tensor]]:  # noqa: ANN001
    out = {}
    for name in ONE_BATCH:
        qmodel = vitq.quantize(copy.deepcopy(model), vitq.recipe(name, activation={"observer_args": {"max_tokens": 200}}
                                                                 if name == "omse" else {}))
        module = task.calibration_module(qmodel)
        vitq.calibrate(qmodel, lambda m, module=module: [module.validation_step(b, i) for i, b in enumerate(loader)],
                       whole_set=whole)
        out[name] = {k: v.clone() for k, v in qmodel.state_dict().items()}
    return out


def _method_worker(rank: int, world: int, port: int, cfgs: tuple[dict, dict], out_dir: str) -> None:
    _join(rank, world, port)
    try:
        task, model, calib, _ = _setup(cfgs)
        states = {}
        for name in METHODS:
            recipe = vitq.recipe(name)
            qmodel = vitq.quantize(copy.deepcopy(model), recipe)
            module = task.calibration_module(qmodel)
            batches = sharded(calib, world, "calibration") if recipe.calib_flow == "float" else calib

            def loop(m: torch.nn.Module, module=module, batches=batches) -> None:  # noqa: ANN001
                for i, batch in enumerate(batches):
                    module.validation_step(batch, i)

            vitq.calibrate(qmodel, loop)  # ends with the check that every rank holds the same parameters
            states[name] = {k: v.clone() for k, v in qmodel.state_dict().items()}
        loader, whole = shard_or_replicate(task.calib_loader(32, 32, 0), world, "calibration")
        torch.save({"states": states, "violations": nccl_rule.violations, "whole": whole,
                    "one_batch": _one_batch(task, model, loader, whole)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_method_calibrates_under_the_nccl_rule(tmp_path, free_port, one_thread):
    cfg = tiny_cfg(tmp_path, "task.batch_size=32")
    cfgs = (OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.model, resolve=True))
    mp.spawn(_method_worker, args=(2, free_port(), cfgs, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["violations"] for r in ranks] == [[], []]
    for name in METHODS:
        a, b = (r["states"][name] for r in ranks)
        assert a.keys() == b.keys() and any(k.endswith("scale") for k in a), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # fewer batches than processes: every process runs the one batch and nothing is merged, giving the
    # scales of one process (merging would count the batch twice: the EMA and the token sample differ)
    assert [r["whole"] for r in ranks] == [True, True]
    task, model, _, _ = _setup(cfgs)
    single = _one_batch(task, model, task.calib_loader(32, 32, 0), False)
    for name, want in single.items():
        for r in ranks:
            assert all(torch.equal(r["one_batch"][name][k], v) for k, v in want.items()), name
