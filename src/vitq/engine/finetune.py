"""The `finetune` stage: quantization-aware finetuning with distillation from the float model.

It runs after the recipe's stages when `quant.finetune.epochs > 0`. The calibrated model's uniform grids
learn their steps and zero points (and the weights when asked, `vitq.quant.finetune.QuantTraining`);
the loss is the task's own plus distillation from the float model (the task names both terms,
`Task.finetune_losses`). Training goes through `trainer.fit` with a validation loop on training images
held out from finetuning and a checkpoint every epoch in `<run>/finetune/`.

Resuming: the model finetuning starts from is saved as `<run>/finetune/start.ckpt` before the first
step; a run started again in the same directory with `quant.finetune.ckpt_path=last` loads it (the
recipe's stages do not run again) and Lightning restores the last epoch's weights, optimizer and
schedule. The order of the training images and the random state of every epoch depend only on
(seed, epoch, rank), so the resumed run ends where an uninterrupted one ends.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

import vitq

from ..distributed import check_same_on_ranks, rank_world
from ..quant.ops import keep_float_weights
from ..quant.finetune import QuantTraining
from .schema import FinetuneConf
from .context import RunContext, processes, register_stage
from .finetune_data import finetune_data, step_seed
from .tasks import Task

log = logging.getLogger(__name__)

FINETUNE_DIR = "finetune"
START = "start.ckpt"
LOSS_TERMS = ("task", "kd", "feature")  # what Task.finetune_losses may return as losses; other keys are metrics


@dataclass
class ResumePlan:
    """What a run resumes, decided on rank 0 (`decided_on_rank0`): the saved start model and the Lightning
    checkpoint (None: finetuning from its first step), or the error every rank raises."""

    start: Path | None = None
    ckpt: Path | None = None
    error: str = ""
    note: str = ""  # said once, on rank 0


def resume_plan(options: FinetuneConf, out_dir: Path, requeued: bool = False) -> ResumePlan:
    """The finetune run to resume: `quant.finetune.ckpt_path` (`last`: this run directory's), or, in a
    requeued job (`run.is_requeue`), this directory's own when it holds one. A requested resume that finds
    nothing fails; a requeue with nothing saved starts over and says so."""
    if options.epochs == 0:
        return ResumePlan()
    folder = out_dir / FINETUNE_DIR
    start, last = folder / START, folder / "last.ckpt"
    asked = options.ckpt_path == "last"
    if asked or (requeued and not options.ckpt_path):  # this directory's own run
        if not start.is_file():
            if asked:
                return ResumePlan(error=f"quant.finetune.ckpt_path=last: {out_dir} holds no finetune checkpoint "
                                        f"({start} is missing). Under -m (multirun) Hydra ignores hydra.run.dir and "
                                        "gives every job a new directory: pass the checkpoint itself, "
                                        "quant.finetune.ckpt_path=<the run's directory>/finetune/last.ckpt")
            return ResumePlan(note=f"requeued: {out_dir} holds no finetune checkpoint (the earlier attempt stopped "
                                  "before finetuning began), so the run starts from the beginning; calibration "
                                  "and reconstruction keep no state between attempts")
        ckpt = last if last.is_file() else None  # none: stopped before a first checkpoint; from the start model
        note = "" if asked else (f"requeued: finetuning resumes from {ckpt.resolve() if ckpt else start}; the stages "
                                 "before it are not run again")
        return ResumePlan(start, ckpt, note=note)
    if not options.ckpt_path:
        return ResumePlan()
    ckpt = Path(str(options.ckpt_path))
    if not ckpt.is_file():
        return ResumePlan(error=f"quant.finetune.ckpt_path={ckpt} does not exist; pass a .ckpt from a run's "
                                f"{FINETUNE_DIR}/ directory, or last with hydra.run.dir=<that run's directory>")
    if not (ckpt.parent / START).is_file():
        return ResumePlan(error=f"quant.finetune.ckpt_path={ckpt}: its start model {ckpt.parent / START} is missing "
                                f"(a finetune checkpoint resumes together with the {START} saved beside it)")
    return ResumePlan(ckpt.parent / START, ckpt)


def resumed_epoch(path: Path) -> int:
    """The epoch a run resumed from this checkpoint starts at (the number of epochs it has processed)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ckpt["epoch"]) + 1


class FinetuneModule(L.LightningModule):
    """The quantized student, trained against the task loss and the float teacher.

    The teacher is a plain attribute, not a submodule: it is neither trained, checkpointed nor wrapped by
    DDP.
    """

    def __init__(self, task: Task, student: torch.nn.Module, teacher: torch.nn.Module, training: QuantTraining,
                 options: FinetuneConf, steps_per_epoch: int) -> None:
        super().__init__()
        self.task, self.student, self.options, self.training_parts = task, student, options, training
        self.steps_per_epoch = int(steps_per_epoch)  # per process
        self.__dict__["teacher"] = teacher.eval()
        self.weights = {"task": options.task_weight, "kd": options.kd_weight, "feature": options.feature_weight}

    def on_fit_start(self) -> None:
        for model in (self.student, self.teacher):
            model.to(self.device)  # a model's own .to (mmengine's keeps its preprocessor's device in step)
        self.teacher.eval()

    def on_train_start(self) -> None:  # also for a run resumed mid-epoch, which skips on_train_epoch_start
        self.student.train(self.options.train_mode)

    def on_train_epoch_start(self) -> None:  # after every validation loop (which leaves the module in eval)
        self.student.train(self.options.train_mode)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The random state of a step (dropout, QDrop-style drops) from (seed, epoch, step in epoch, rank):
        a run resumed mid-epoch draws what the uninterrupted run drew."""
        torch.manual_seed(step_seed(self.options.seed, self.current_epoch, batch_idx, rank_world()[0]))

    def _terms(self, batch: Any, stage: str) -> torch.Tensor:
        """The weighted sum of the task's loss terms; every term and metric logged under `stage/`."""
        out = self.task.finetune_losses(self.student, self.teacher, batch, self.options.temperature)
        n = self.task.batch_len(batch)
        losses = {k: v for k, v in out.items() if k in LOSS_TERMS and self.weights[k] != 0}
        if not losses:
            raise ValueError(f"finetuning has no loss: the task gave {sorted(out)} and the weights are {self.weights}")
        total = sum(self.weights[k] * v for k, v in losses.items())
        for name, value in out.items():
            self.log(f"{stage}/{name}", value.detach().float(), batch_size=n, sync_dist=stage == "val",
                     prog_bar=stage == "val" and name not in LOSS_TERMS)
        self.log(f"{stage}/loss", total.detach(), batch_size=n, prog_bar=True, sync_dist=stage == "val")
        return total

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._terms(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._terms(batch, "val")

    def configure_optimizers(self):  # noqa: ANN201
        o, t = self.options, self.training_parts.trainables
        groups = [{"params": t.steps + t.zero_points, "lr": o.lr, "weight_decay": 0.0}]
        if t.weights:
            groups.append({"params": t.weights, "lr": o.weight_lr or o.lr, "weight_decay": o.weight_decay})
        opt = torch.optim.AdamW([g for g in groups if g["params"]])
        # not trainer.estimated_stepping_batches: it builds the training loader's iterator before Lightning
        # restores a checkpoint's loader state, so a run resumed mid-epoch would not skip the trained batches
        total = max(1, self.steps_per_epoch * o.epochs)
        warm = total * o.warmup_epochs // max(1, o.epochs)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))

        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}


def save_start(ctx: RunContext, path: Path) -> None:
    """The model finetuning starts from, with the exact float weights (the teacher of a resumed run)."""
    kept_now = keep_float_weights(ctx.qmodel, ctx.fp_model)
    try:
        vitq.save_quantized(ctx.qmodel, path, meta=ctx.run.meta())
    finally:
        if kept_now:  # the final checkpoint keeps them only if finetuning changes the weights
            ctx.qmodel.vitq.float_state = None


@register_stage("finetune")
def finetune_stage(ctx: RunContext) -> None:
    """Train the quantized model's quantizer parameters (and weights) by `trainer.fit`."""
    options = ctx.run.finetune
    folder = ctx.out_dir / FINETUNE_DIR
    resuming = ctx.resume_from is not None
    if rank_zero_only.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if not resuming:
            for old in folder.glob("*.ckpt"):  # a reused directory starts over unless it resumes
                old.unlink()
        if not (folder / START).is_file():  # (resuming another directory's run: this one can resume too)
            save_start(ctx, folder / START)
    # last.ckpt links the newest of both (no version counter: one `last` for both callbacks)
    common = dict(dirpath=str(folder), auto_insert_metric_name=False, save_last="link", save_top_k=1,
                  enable_version_counter=False)
    checkpoints = [ModelCheckpoint(filename="epoch{epoch}", every_n_epochs=1, save_on_train_epoch_end=True, **common)]
    if options.every_n_train_steps > 0:  # a preempted epoch resumes from its last step checkpoint
        checkpoints.append(ModelCheckpoint(filename="step{step}", every_n_train_steps=options.every_n_train_steps,
                                           **common))
    trainer = ctx.make_trainer(max_epochs=options.epochs, callbacks=checkpoints, enable_checkpointing=True,
                               use_distributed_sampler=False, gradient_clip_val=options.grad_clip,
                               check_val_every_n_epoch=1)
    resume_ckpt = ctx.resume_ckpt
    data = finetune_data(ctx, options, trainer, first_epoch=resumed_epoch(resume_ckpt) if resume_ckpt else 0)
    world = processes(trainer)
    steps = len(data.train)  # batches per process and epoch: this rank's share in whole and last partial batches
    trainer.log_every_n_steps = max(1, min(50, steps // 4))  # a few points per epoch, even in short ones
    training = QuantTraining(ctx.qmodel, weights=options.weights, zero_points=options.zero_points)
    module = FinetuneModule(ctx.task, ctx.qmodel, ctx.fp_model, training, options, steps)
    counts = training.trainables.count()
    log.info("finetune: %d epochs on %d images (%d held out), training %s", options.epochs, len(data.train.dataset),
             len(data.val.dataset) if data.val is not None else 0, counts)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # start.ckpt
            trainer.fit(module, train_dataloaders=data.train, val_dataloaders=data.val,
                        ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    except BaseException:
        if (folder / "last.ckpt").is_file() and rank_zero_only.rank == 0:
            log.error("finetune stopped; a requeued job resumes by itself, otherwise run the same overrides plus "
                      "quant.finetune.ckpt_path=%s (also from a multirun)", (folder / "last.ckpt").resolve())
        raise
    finally:
        training.finish()
        ctx.qmodel.cpu(), ctx.fp_model.cpu()
    if options.weights:  # the checkpoint's float baseline stays the true float model
        keep_float_weights(ctx.qmodel, ctx.fp_model)
    check_same_on_ranks(dict(ctx.qmodel.state_dict()), "after finetuning")
    if world > 1:
        log.info("finetune: every parameter is identical on the %d processes", world)
    ctx.finetuned = True
    ctx.timings["finetune"] = time.perf_counter() - start
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}  # the last epoch's
    ctx.info.update(finetune_epochs=options.epochs, finetune_seconds=round(ctx.timings["finetune"], 2),
                    finetune_resumed=resuming, finetune_trained=counts,
                    **{f"finetune_{k.replace('/', '_')}": round(v, 4) for k, v in val.items()})
