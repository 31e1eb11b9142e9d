"""The stage pipeline: named stages over one run context.

A run is `float` -> the stages its method names (`calibrate` for every method today; later methods add
e.g. `reconstruct`, `finetune`) -> `test` (or, asked for, `analyze` or `export`: `engine/deploy.py`). A quantized checkpoint replaces the middle with `load`.
Stages register by name in `context.STAGES` (the reconstruct and finetune stages in their own modules;
`vitq.engine` imports all three); `stage=<name>` stops the run after that stage.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

import vitq

from ..distributed import shard_or_replicate, sharded
from ..files import written_atomically
from ..quant.modules import integer_arithmetic
from ..report.table import float_layers_line, print_results, results_row
from .agreement import decided_on_rank0
from .context import STAGES, RunContext, processes, register_stage
from .float_model import float_key, obtain_float_model

log = logging.getLogger(__name__)


REQUESTED = ("analyze", "export")  # stages a run has only when asked (stage=<name>), in the test stage's place


def pipeline(ctx: RunContext) -> list[str]:
    middle = ["load"] if ctx.checkpoint is not None else list(ctx.method.stages)
    if ctx.run.finetune.epochs > 0:
        middle.append("finetune")
    unknown = [s for s in middle if s not in STAGES]
    if unknown:
        raise ValueError(f"method {ctx.method.name!r} needs stage(s) {unknown} that are not registered; "
                         f"known stages: {', '.join(STAGES)}")
    return ["float", *middle, ctx.run.stage if ctx.run.stage in REQUESTED else "test"]


@register_stage("float")
def float_stage(ctx: RunContext) -> None:
    start = time.perf_counter()
    if ctx.checkpoint is not None:  # the float model is the one inside the quantized checkpoint
        path = ctx.checkpoint_path
        meta = ctx.checkpoint.get("meta") or {}
        for group in ("model", "task"):
            made_with = (meta.get(group) or {}).get("name")
            this_run = getattr(ctx.run, group)["name"]
            if made_with is not None and made_with != this_run:
                raise ValueError(f"{path} was made with {group}={made_with}, this run has {group}="
                                 f"{this_run}: pass {group}={made_with}")
        model = ctx.task.create_model(pretrained=False)  # architecture only
        model.load_state_dict(vitq.quant.float_state_dict(ctx.checkpoint, model))
        ctx.fp_model, ctx.float_source = model.eval(), f"float weights of {path}"
        ctx.float_key = float_key(ctx.run.model, ctx.run.task, ctx.task, ctx.run.seed) + "-ckpt"
    else:
        ctx.fp_model, ctx.float_source, ctx.float_key = obtain_float_model(
            ctx.task, ctx.run.model, ctx.run.task, ctx.cache, ctx.run.seed, ctx.make_trainer)
    ctx.timings["float"] = time.perf_counter() - start
    log.info("float model: %s", ctx.float_source)


@register_stage("calibrate")
def calibrate_stage(ctx: RunContext) -> None:
    """Observe calibration batches through `Trainer.validate`, then let the method's hooks search,
    reparameterize and switch kernels. Under DDP a float calibration flow shards the batches (merged
    after); a quantized flow feeds every process the whole set (`vitq.calibrate`)."""
    ctx.qmodel = vitq.quantize(copy.deepcopy(ctx.fp_model), ctx.recipe)
    ctx.info["calib_samples"] = ctx.run.calib.num_samples
    if not any(p.configured for _, p in vitq.iter_points(ctx.qmodel)):
        return
    module = ctx.task.calibration_module(ctx.qmodel)
    start = time.perf_counter()
    trainer = ctx.make_trainer(use_distributed_sampler=False)
    if ctx.recipe.calib_flow == "float" and not ctx.recipe.method_impl().calibrates_in_order():
        loader, whole = shard_or_replicate(ctx.calib_loader, processes(trainer), "the calibration loader")
        if whole:
            log.info("calibration: %d image(s) in batches of %d make fewer batches than the %d processes, so every "
                     "process runs all of them (the statistics of one process, nothing to merge)",
                     ctx.run.calib.num_samples, ctx.calib_loader.batch_size, processes(trainer))
    else:  # every process sees every batch, in order: its points fit what the quantized upstream gives,
        loader, whole = ctx.calib_loader, True  # or a module acts on the last batch
    vitq.calibrate(ctx.qmodel, lambda m: trainer.validate(module, dataloaders=loader, verbose=False), whole_set=whole,
                   batches=len(ctx.calib_loader))
    ctx.timings["calibrate"] = time.perf_counter() - start


@register_stage("load")
def load_stage(ctx: RunContext) -> None:
    ctx.qmodel = vitq.load_quantized(copy.deepcopy(ctx.fp_model), ctx.checkpoint)
    ctx.recipe = ctx.qmodel.vitq.recipe
    calib = ((ctx.checkpoint.get("meta") or {}).get("quant") or {}).get("calib") or {}
    ctx.info["calib_samples"] = calib.get("num_samples")


def evaluate(ctx: RunContext, model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Per-sample outcomes of every task metric."""
    module = ctx.task.eval_module(model, prefix)
    trainer = ctx.make_trainer()
    trainer.test(module, dataloaders=sharded(ctx.task.test_loader(), processes(trainer), "the evaluation loader"),
                 verbose=False)
    return module.samples


def _read_outcomes(path: Path, desc: str) -> dict[str, list] | None:
    """The cached float outcomes for this evaluation data, or None (absent, for other data, unreadable)."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        return stored["samples"] if stored.get("data") == desc else None
    except (ValueError, AttributeError, KeyError, TypeError) as e:  # damaged: evaluate again, overwrite it
        log.warning("float-metrics cache %s is unreadable (%s: %s); evaluating the float model again",
                    path, type(e).__name__, e)
        return None


def float_outcomes(ctx: RunContext) -> dict[str, torch.Tensor]:
    """Float per-sample outcomes, computed once per float model and evaluation data (cached)."""
    desc = json.dumps(ctx.task.describe(), sort_keys=True, default=str)
    path = ctx.cache / f"{ctx.float_key}.fp-outcomes.json"
    stored = decided_on_rank0(ctx.make_trainer, lambda: _read_outcomes(path, desc))  # every rank follows rank 0
    if stored is not None:
        return {k: torch.tensor(v) for k, v in stored.items()}
    samples = evaluate(ctx, ctx.fp_model, "fp")
    cacheable = all(isinstance(v, torch.Tensor) for v in samples.values())  # records of other shapes are not cached
    if cacheable and not ctx.float_key.endswith(("-pretrained", "-ckpt")) and rank_zero_only.rank == 0:
        with written_atomically(path) as tmp:
            tmp.write_text(json.dumps({"data": desc, "samples": {k: v.tolist() for k, v in samples.items()}}))
    return samples


@register_stage("test")
def test_stage(ctx: RunContext) -> None:
    """Float and quantized metrics side by side, each delta with its paired 95% interval."""
    fp = float_outcomes(ctx)
    quant = evaluate(ctx, ctx.qmodel, "quant")
    kinds = sorted({a for m in ctx.qmodel.modules() if (a := integer_arithmetic(m)) is not None})
    integer = ",".join(kinds) or False  # the integer arithmetic the LayerNorms / softmaxes ran
    metrics = ctx.task.metrics
    float_layers = vitq.float_layers(ctx.qmodel)
    ctx.info["float_layers"] = len(float_layers)
    described = ctx.recipe.method_impl().describe_model(ctx.qmodel)  # e.g. a mixed-precision bit map
    ctx.info.update(described)
    row = results_row(ctx.run.model["name"], ctx.run.task["name"], ctx.recipe, metrics, fp, quant, ctx.qmodel,
                      compare=ctx.task.compare, **ctx.info, integer=integer,
                      calib_seconds=round(ctx.timings.get("calibrate", 0.0), 2), float_source=ctx.float_source, primary=ctx.task.primary)
    if integer:
        row["setting"] += f" integer:{integer}"
    if ctx.finetuned:
        row["setting"] += f" +finetune {ctx.info.get('finetune_epochs')} ep"
    ctx.row = row
    if rank_zero_only.rank == 0:  # per-image outcomes, so two runs can be compared with a paired interval
        with written_atomically(ctx.out_dir / "outcomes.pt") as tmp:
            torch.save({m: v.cpu() if torch.is_tensor(v) else v for m, v in quant.items()}, tmp)
    points = vitq.summary(ctx.qmodel)
    for lg in ctx.loggers:
        lg.log_metrics({**{f"fp/{m}": row[f"fp_{m}"] for m in metrics},
                        **{f"quant/{m}": row[f"quant_{m}"] for m in metrics},
                        **{f"quant/delta_{m}": row[f"delta_{m}"] for m in metrics},
                        "calib/seconds": row["calib_seconds"]})
        if described:
            lg.log_hyperparams({f"method/{k}": v for k, v in described.items()})
        if isinstance(lg, WandbLogger) and rank_zero_only.rank == 0:  # other ranks hold a dummy experiment
            cols = list(points[0])
            lg.log_table(key="quant/points", columns=cols, data=[[r[c] for c in cols] for r in points])
            lg.experiment.summary.update({"recipe": row["recipe"], "scope": row["scope"], "setting": row["setting"]})
    print_results([row], metrics)
    made = "finetuned" if ctx.finetuned else "calibrated"
    print(f"quantized model: {'checkpoint ' + ctx.checkpoint_path if ctx.checkpoint else made}"
          f"{' then finetuned' if ctx.checkpoint and ctx.finetuned else ''}; "
          f"{sum(p['mode'] == 'quant' for p in points)} of {len(points)} points quantized ({ctx.recipe.describe()})")
    if line := float_layers_line(float_layers):
        print(line)
    ctx.artifacts["points"] = points
