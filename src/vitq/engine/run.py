"""Run the stages for one composed config, and write the run's outputs."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import secrets
import shutil
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import vitq

from ..memory import return_freed_memory
from ..report.curves import plot_finetune_curves
from ..report.table import print_points
from .config import validate
from .agreement import decided_on_rank0
from .finetune import resume_plan
from .float_model import cache_dir
from .lifecycle import RunInterrupted, acquire, release, signals_end_the_run
from .context import STAGES, RunContext
from ..export.verify import model_input
from .deploy import check_exportable
from .stages import pipeline
from .tasks import get_task
from .wandb_outputs import publish

log = logging.getLogger(__name__)

PREEMPTED = "PREEMPTED"  # the run ended on submitit's USR2: a requeue of the job resumes in this directory
WANDB_ID = ".wandb-id"  # the run's W&B id, so that a resumed run continues the same W&B run
RESULT_FILES = ("FAILED", PREEMPTED, "results.json", "quantized.ckpt", "points.csv", "layernorm_ranges.json",
                "layernorm_ranges.png", "finetune_curves.png", "outcomes.pt")


def build_loggers(cfg: DictConfig, out_dir: Path) -> list[Logger]:
    """Every entry of the `logger` group, instantiated with the run directory as save_dir. W&B resumes
    this directory's run (`id` kept in `<run>/.wandb-id`, `resume="allow"`), and the jobs of one multirun
    share a group, unless the entry sets them."""
    loggers = []
    for entry in (cfg.logger or {}).values():
        if entry is None:
            continue
        extra: dict[str, Any] = {}
        if str(entry.get("_target_", "")).endswith("WandbLogger"):
            extra = {k: v for k, v in wandb_identity(out_dir).items() if entry.get(k) is None}
        loggers.append(instantiate(entry, save_dir=str(out_dir), **extra))
    return loggers


def wandb_identity(out_dir: Path) -> dict[str, Any]:
    """id (this directory's, made once on rank 0), resume="allow", and the multirun's group."""
    if rank_zero_only.rank != 0:  # other ranks hold Lightning's dummy experiment
        return {}
    path = out_dir / WANDB_ID
    if not path.is_file():
        path.write_text(secrets.token_hex(4))  # W&B's id alphabet (lower-case letters and digits)
    identity: dict[str, Any] = {"id": path.read_text().strip(), "resume": "allow"}
    with contextlib.suppress(ValueError):  # not inside a Hydra job (vitq's own API, tests)
        hydra = HydraConfig.get()
        if hydra.mode == RunMode.MULTIRUN:
            identity["group"] = Path(str(hydra.sweep.dir)).name
    return identity


def make_trainer_factory(cfg: DictConfig, loggers: list[Logger]):  # noqa: ANN201
    """Trainers from the `trainer` group (hydra instantiate), with the run's loggers and fresh callbacks."""
    def make(**kwargs: Any) -> L.Trainer:
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        callbacks += kwargs.pop("callbacks", [])  # a stage's own (e.g. the finetune checkpoints)
        logger = kwargs.pop("logger", loggers or False)
        args = {k: v for k, v in {"enable_checkpointing": False, "enable_model_summary": False,
                                  "num_sanity_val_steps": 0, "log_every_n_steps": 10}.items() if k not in cfg.trainer}
        if SLURMEnvironment.detect() and "plugins" not in cfg.trainer:  # submitit requeues (USR2), not Lightning
            args["plugins"] = [SLURMEnvironment(auto_requeue=False)]
        args.update(kwargs)
        return instantiate(cfg.trainer, logger=logger, callbacks=callbacks, **args)

    return make


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Execute the configured stages in a directory this run owns. A failed or interrupted run (SIGTERM,
    SIGINT: `RunInterrupted`) leaves FAILED and its logs, and no result file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire(out_dir) if rank_zero_only.rank == 0 else None  # refused: the directory is not ours
    loggers: list[Logger] = []
    try:
        requeued = continuing = False
        if lock is not None:  # a reused directory must not mix an old result with a new failure
            requeued = is_requeue(out_dir)
            continuing = requeued or bool(OmegaConf.select(cfg, "quant.finetune.ckpt_path"))
            _discard_results(out_dir)
            if not continuing:  # a requeued or resumed run continues the CSV history and the W&B run
                shutil.rmtree(out_dir / "csv", ignore_errors=True)
                (out_dir / WANDB_ID).unlink(missing_ok=True)
        with signals_end_the_run():
            row = _run(cfg, out_dir, loggers, requeued, continuing)
            publish(loggers, out_dir, row if (out_dir / "results.json").is_file() else None,
                    bool(cfg.get("log_checkpoint", False)), str(cfg.run_name))
        _close(loggers, ok=True)
        return row
    except BaseException as e:
        preempted = isinstance(e, RunInterrupted) and e.preempted
        with contextlib.suppress(Exception):  # the logs of a failed run are kept, marked failed
            _close(loggers, ok=False, preempted=preempted)
        if lock is not None:
            _discard_results(out_dir)
            reason = str(e) if isinstance(e, RunInterrupted) else f"{type(e).__name__}: {e}"
            if preempted:
                reason += ("; a requeue of this job (submitit) resumes in this directory by itself: finetuning "
                           "from its last checkpoint, the stages before it from the beginning")
            cause = f"\ncaused by {type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else ""
            (out_dir / (PREEMPTED if preempted else "FAILED")).write_text(
                f"{reason}{cause}\n\n{traceback.format_exc()}")
        raise
    finally:
        if lock is not None:
            release(lock)


def _discard_results(out_dir: Path) -> None:
    for name in RESULT_FILES:
        (out_dir / name).unlink(missing_ok=True)
        for partial in out_dir.glob(f".{name}.*.partial"):
            partial.unlink(missing_ok=True)


CSV_EARLIER = ".metrics.earlier-attempts.csv"  # beside metrics.csv while a requeued attempt runs


def keep_csv_history(loggers: list[Logger]) -> None:
    """Before a requeued or resumed attempt logs: set the earlier attempts' CSV rows aside (Lightning's CSV writer
    deletes `metrics.csv` when it starts); `_close` puts them back in front of this attempt's rows."""
    for path in _csv_files(loggers):
        earlier = path.with_name(CSV_EARLIER)
        if path.is_file():
            _write_rows(earlier, _read_rows(earlier) + _read_rows(path))  # (an attempt killed before _close)
            path.unlink()


def _merge_csv_history(loggers: list[Logger]) -> None:
    for path in _csv_files(loggers):
        earlier = path.with_name(CSV_EARLIER)
        if earlier.is_file():
            _write_rows(path, _read_rows(earlier) + _read_rows(path))
            earlier.unlink()


def _csv_files(loggers: list[Logger]) -> list[Path]:
    return [Path(lg.log_dir) / "metrics.csv" for lg in loggers if isinstance(lg, CSVLogger)]


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    fields = sorted({k for row in rows for k in row})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def is_requeue(out_dir: Path) -> bool:
    """This start continues a preempted attempt: the attempt left PREEMPTED here, or SLURM says the job was
    requeued (`SLURM_RESTART_COUNT`, also after an attempt killed before it could write anything)."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return (out_dir / PREEMPTED).is_file() or (restarts.isdigit() and int(restarts) > 0)


def _close(loggers: list[Logger], ok: bool, preempted: bool = False) -> None:
    for lg in loggers:
        lg.finalize("success" if ok else "failed")
        lg.save()  # file loggers write what they buffered (a failed run's metrics included)
    if rank_zero_only.rank == 0:
        _merge_csv_history(loggers)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if preempted and wandb.run is not None:
            wandb.run.mark_preempting()  # W&B shows it preempted; the requeue resumes the same run id
        wandb.finish(exit_code=0 if ok else 1)


def _run(cfg: DictConfig, out_dir: Path, loggers: list[Logger], requeued: bool = False,
         continuing: bool = False) -> dict[str, Any]:
    """The stages; `loggers` is filled as they are built, so a failure can still close them."""
    settings = validate(cfg)
    recipe = settings.recipe
    if cfg.get("release_memory", True):
        return_freed_memory()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    L.seed_everything(settings.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    task = get_task(str(settings.task["name"]).lower())(settings.task, settings.model)  # checks the data now
    probe = task.create_model(pretrained=False)
    vitq.quantize(probe, recipe)  # the recipe fits the model (point names do not depend on the weights)
    if settings.stage in ("analyze", "export"):  # an image-tensor task, checked on one batch before any stage
        model_input(next(iter(task.test_loader())))
    if settings.stage == "export" and not settings.from_checkpoint:  # (a checkpoint's recipe is checked at export)
        check_exportable(probe, settings.export.opset)  # its grids and bits, in seconds rather than after calibrating
    if settings.stage == "summary":
        points = vitq.summary(probe)
        print_points(points, float_layers=vitq.float_layers(probe))
        print(f"recipe {recipe.name}: {recipe.describe()}")
        return {"points": len(points)}
    del probe
    loggers.extend(build_loggers(cfg, out_dir))
    if continuing:
        keep_csv_history(loggers)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    ctx = RunContext(run=settings, out_dir=out_dir, task=task, recipe=recipe, method=recipe.method_impl(),
                     make_trainer=make_trainer_factory(cfg, loggers), loggers=loggers,
                     cache=cache_dir(settings.cache_dir))
    plan = decided_on_rank0(ctx.make_trainer, lambda: resume_plan(settings.finetune, out_dir, requeued))
    if plan.error:  # raised on every rank, so none waits for the others
        raise FileNotFoundError(plan.error)
    if plan.note:
        log.warning(plan.note)
    ctx.resume_from, ctx.resume_ckpt = plan.start, plan.ckpt
    if settings.from_checkpoint or ctx.resume_from is not None:  # a resumed finetune starts from its saved model
        ctx.checkpoint_path = str(ctx.resume_from or settings.from_checkpoint)
        ctx.checkpoint = vitq.read_quantized(ctx.checkpoint_path)
    else:  # built now so that too many samples fail before training
        c = settings.calib
        ctx.calib_loader = task.calib_loader(c.num_samples, c.batch_size, c.seed)
    stages = pipeline(ctx)
    if settings.stage not in ("all", "test") and settings.stage not in stages:
        raise ValueError(f"stage={settings.stage} is not part of this run ({' -> '.join(stages)})")
    stop = stages[-1] if settings.stage in ("all", "test") else settings.stage
    for name in stages:
        STAGES[name](ctx)
        if name == stop:
            break
    if rank_zero_only.rank == 0:
        _write_outputs(ctx)
    return ctx.row or {"stages": stages[: stages.index(stop) + 1], "float_source": ctx.float_source,
                       **ctx.artifacts.get("result", {})}


def _layernorm_ranges(ctx: RunContext) -> None:
    """Per-channel ranges of LayerNorm inputs on a few calibration batches (why PTF exists)."""
    from ..report.ranges import layernorm_input_ranges, plot_ranges, range_table

    c = ctx.run.calib
    loader = ctx.task.calib_loader(min(256, c.num_samples), 64, c.seed)

    def forward_loop(model: torch.nn.Module) -> None:  # rank 0 alone: no trainer (DDP would wait for peers)
        module = ctx.task.calibration_module(model)
        with torch.no_grad():
            for i, batch in enumerate(loader):
                module.validation_step(batch, i)

    ranges = layernorm_input_ranges(ctx.fp_model, forward_loop)
    with open(ctx.out_dir / "layernorm_ranges.json", "w") as f:
        json.dump(range_table(ranges), f, indent=1)
    plot_ranges(ranges, ctx.out_dir / "layernorm_ranges.png",
                f"{ctx.run.model['name']} on {ctx.run.task['name']}: LayerNorm input range per channel")


def _write_outputs(ctx: RunContext) -> None:
    """Write result files last, the checkpoint atomically, so only finished runs look finished."""
    if ctx.qmodel is not None and (ctx.checkpoint is None or ctx.finetuned):
        vitq.save_quantized(ctx.qmodel, ctx.out_dir / "quantized.ckpt", meta=ctx.run.meta())
        if ctx.recipe.scope == "full":
            _layernorm_ranges(ctx)
    if ctx.finetuned:
        for lg in ctx.loggers:
            lg.save()  # the CSV log holds every step so far
        rows = [row for path in _csv_files(ctx.loggers)
                for row in _read_rows(path.with_name(CSV_EARLIER)) + _read_rows(path)]  # earlier attempts first
        plot_finetune_curves(rows, ctx.out_dir / "finetune_curves.png",
                             f"{ctx.run.model['name']} on {ctx.run.task['name']}: finetuning {ctx.recipe.describe()}")
    points = ctx.artifacts.get("points")
    if points:
        with open(ctx.out_dir / "points.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(points[0]))
            writer.writeheader()
            writer.writerows(points)
    if ctx.row is not None:
        (ctx.out_dir / "results.json").write_text(json.dumps(ctx.row, indent=2, default=str))
