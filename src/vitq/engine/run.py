"""Run the stages for one composed config: float -> calibrate -> test, and report."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import vitq

from ..report.table import print_points, print_results, results_row
from .config import validate
from .float_model import cache_dir, obtain_float_model
from .module import ClassificationModule

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig, out_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
    if cfg.logger.wandb:
        w = cfg.logger.wandb
        offline = os.environ.get("WANDB_MODE", "offline") != "online"
        loggers.append(WandbLogger(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags or []),
                                   name=cfg.run_name, save_dir=str(out_dir), offline=offline))
    return loggers


def make_trainer_factory(cfg: DictConfig, loggers: list[Logger]):  # noqa: ANN201
    t = cfg.trainer

    def make(**kwargs: Any) -> L.Trainer:
        return L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                         strategy=t.strategy, precision=t.precision, logger=loggers or False,
                         callbacks=[RichProgressBar(leave=True)], enable_checkpointing=False, log_every_n_steps=10,
                         enable_model_summary=False, num_sanity_val_steps=0, **kwargs)

    return make


def _evaluate(make_trainer, model: torch.nn.Module, dm: Any, prefix: str) -> dict[str, float]:  # noqa: ANN001
    module = ClassificationModule(model, dm.num_classes, prefix=prefix)
    out = make_trainer().test(module, dataloaders=dm.test_dataloader(), verbose=False)[0]
    return {k: float(v) for k, v in out.items()}


def _float_metrics(make_trainer, model, dm, cache: Path, key: str) -> dict[str, float]:  # noqa: ANN001
    """Float top-1/top-5, computed once per float model and evaluation split."""
    desc = json.dumps(dm.describe(), sort_keys=True, default=str)
    path = cache / f"{key}.fp-metrics.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("data") == desc:
            return stored["metrics"]
    metrics = _evaluate(make_trainer, model, dm, "fp")
    if not key.endswith(("-pretrained", "-ckpt")) and rank_zero_only.rank == 0:
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps({"data": desc, "metrics": metrics}))
        os.replace(tmp, path)
    return metrics


RESULT_FILES = ("FAILED", "results.json", "quantized.ckpt", "points.csv", "layernorm_ranges.json",
                "layernorm_ranges.png")


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Execute the configured stages; a failed run leaves a FAILED marker and no result files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        for name in RESULT_FILES:  # a reused directory must not mix an old result with a new failure
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "csv", ignore_errors=True)
    try:
        return _run(cfg, out_dir)
    except BaseException as e:
        if rank_zero_only.rank == 0:
            (out_dir / "FAILED").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        raise


def _run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from tasks.classification import build_datamodule

    recipe = validate(cfg)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    cache = cache_dir(cfg.paths.cache_dir)
    loggers = build_loggers(cfg, out_dir)
    make_trainer = make_trainer_factory(cfg, loggers)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)

    # one architecture with random weights: the timm data config (ImageNet-style tasks) and a check of the
    # recipe against the model, both before any training
    from .float_model import create_model

    probe_cfg = {**model_cfg, "pretrained": False, "checkpoint": None}
    probe, data_config = None, None
    if task_cfg["name"] in ("imagenet", "imagefolder"):
        import timm

        probe = create_model(probe_cfg, 1000, 3)
        data_config = timm.data.resolve_data_config({}, model=probe)
        size = getattr(getattr(probe, "patch_embed", None), "img_size", None)  # the built size, not the
        if size is not None:                                                   # pretrained config's
            data_config["input_size"] = (data_config["input_size"][0], *tuple(size))
    dm = build_datamodule(task_cfg, data_config)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if probe is None:
        probe = create_model(probe_cfg, dm.num_classes, dm.in_chans)
    vitq.quantize(probe, recipe)  # point names do not depend on the class or channel count
    if cfg.stage == "summary":
        points = vitq.summary(probe)
        print_points(points)
        print(f"recipe {recipe.name}: {recipe.describe()}")
        return {"points": len(points)}
    del probe
    c = cfg.quant.calib
    # built now so that too many samples fail before training; used by the calibrate stage below
    calib_loader = None if cfg.quant.from_checkpoint else dm.calib_dataloader(c.num_samples, c.batch_size,
                                                                               seed=c.seed)
    ckpt: dict = {}
    if cfg.quant.from_checkpoint:  # the float model is the one inside the quantized checkpoint
        ckpt = vitq.quant.read_quantized(cfg.quant.from_checkpoint)
        fp_model, source, key = _float_from_quantized(cfg, ckpt, probe_cfg, task_cfg, dm)
    else:
        fp_model, source, key = obtain_float_model(model_cfg, task_cfg, dm, cache, cfg.seed, make_trainer)
    log.info("float model: %s", source)
    if cfg.stage == "float":
        return {"float_source": source}

    qmodel = copy.deepcopy(fp_model)
    calib_seconds = 0.0
    if cfg.quant.from_checkpoint:
        vitq.load_quantized(qmodel, ckpt)
        recipe = qmodel.vitq_recipe
        source_q = f"checkpoint {cfg.quant.from_checkpoint}"
    else:
        vitq.quantize(qmodel, recipe)
        source_q = "calibrated"
        if any(p.configured for _, p in vitq.iter_points(qmodel)):
            calib_module = ClassificationModule(qmodel, dm.num_classes, prefix="calib")
            start = time.perf_counter()
            vitq.calibrate(qmodel, lambda m: make_trainer().validate(calib_module, dataloaders=calib_loader,
                                                                      verbose=False))
            calib_seconds = time.perf_counter() - start

    ranges_png = None
    if recipe.scope == "full" and not cfg.quant.from_checkpoint and rank_zero_only.rank == 0:
        ranges_png = _layernorm_ranges(fp_model, dm, cfg, out_dir)
    if cfg.quant.integer:
        switched = vitq.set_integer(qmodel)
        log.info("integer-only LayerNorm/softmax in %d modules", switched)
    integer = any(getattr(m, "integer", False) for m in qmodel.modules())
    fp = _float_metrics(make_trainer, fp_model, dm, cache, key)
    quant = _evaluate(make_trainer, qmodel, dm, "quant")
    points = vitq.summary(qmodel)
    calib_samples = (ckpt.get("meta") or {}).get("quant", {}).get("calib", {}).get("num_samples") if ckpt \
        else int(c.num_samples)
    row = results_row(cfg, recipe, fp, quant, calib_seconds, source, integer, calib_samples)
    for lg in loggers:
        lg.log_metrics({**fp, **quant, "quant/delta_top1": row["delta_top1"], "calib/seconds": calib_seconds})
        if isinstance(lg, WandbLogger):
            cols = list(points[0])
            lg.log_table(key="quant/points", columns=cols, data=[[r[c] for c in cols] for r in points])
            lg.experiment.summary.update({"recipe": row["recipe"], "scope": recipe.scope})
            if ranges_png is not None:
                lg.log_image(key="layernorm_input_ranges", images=[str(ranges_png)])
    print_results([row])
    print(f"quantized model: {source_q}; {sum(p['mode'] == 'quant' for p in points)} of {len(points)} "
          f"points quantized ({recipe.describe()})")
    if rank_zero_only.rank == 0:
        _write_outputs(out_dir, qmodel, row, points, cfg, from_checkpoint=bool(cfg.quant.from_checkpoint))
    for lg in loggers:
        lg.finalize("success")
    if cfg.logger.wandb:
        import wandb

        wandb.finish()
    return row


def _float_from_quantized(cfg: DictConfig, ckpt: dict, model_cfg: dict, task_cfg: dict,
                          dm: Any):  # noqa: ANN202
    """(float model, source, metrics-cache key) from a quantized checkpoint already read."""
    from .float_model import create_model, float_key

    path = cfg.quant.from_checkpoint
    meta = ckpt.get("meta") or {}
    for group in ("model", "task"):
        made_with = (meta.get(group) or {}).get("name")
        if made_with is not None and made_with != cfg[group].name:
            raise ValueError(f"{path} was made with {group}={made_with}, this run has {group}={cfg[group].name}: "
                             f"pass {group}={made_with}")
    model = create_model(model_cfg, dm.num_classes, dm.in_chans)  # architecture only (no weights asked)
    model.load_state_dict(vitq.quant.api.float_state_dict(ckpt, model))
    key = float_key(model_cfg, task_cfg, dm.num_classes, dm.in_chans, cfg.seed) + "-ckpt"
    return model.eval(), f"float weights of {path}", key


def _layernorm_ranges(model: torch.nn.Module, dm: Any, cfg: DictConfig, out_dir: Path) -> Path:
    """Per-channel ranges of LayerNorm inputs on a few calibration batches (why PTF exists)."""
    from ..report.ranges import layernorm_input_ranges, plot_ranges, range_table

    loader = dm.calib_dataloader(min(256, cfg.quant.calib.num_samples), 64, seed=cfg.quant.calib.seed)
    ranges = layernorm_input_ranges(model, lambda m: [m(x) for x, _ in loader])
    with open(out_dir / "layernorm_ranges.json", "w") as f:
        json.dump(range_table(ranges), f, indent=1)
    return plot_ranges(ranges, out_dir / "layernorm_ranges.png", f"{cfg.model.name} on {cfg.task.name}: "
                       "LayerNorm input range per channel")


def _write_outputs(out_dir: Path, qmodel, row, points, cfg, from_checkpoint: bool) -> None:  # noqa: ANN001
    """Write result files last, the checkpoint atomically, so only finished runs look finished."""
    import csv

    if not from_checkpoint:
        meta = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in ("model", "task", "quant")}
        vitq.save_quantized(qmodel, out_dir / "quantized.ckpt", meta=meta)
    with open(out_dir / "points.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    (out_dir / "results.json").write_text(json.dumps(row, indent=2, default=str))
