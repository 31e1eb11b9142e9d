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
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

import vitq

from ..distributed import EpochShuffle, check_same_on_ranks, rank_world, sharded
from ..quant.ops import keep_float_weights
from ..quant.finetune import QuantTraining
from .schema import FinetuneConf
from .context import RunContext, processes, register_stage
from .tasks import Task

log = logging.getLogger(__name__)

FINETUNE_DIR = "finetune"
START = "start.ckpt"
LOSS_TERMS = ("task", "kd", "feature")  # what Task.finetune_losses may return as losses; other keys are metrics


def resume_checkpoint(options: FinetuneConf, out_dir: Path) -> Path:
    """The Lightning checkpoint `quant.finetune.ckpt_path` names (`last`: this run directory's last epoch);
    the model finetuning started from, `start.ckpt`, sits beside it."""
    return out_dir / FINETUNE_DIR / "last.ckpt" if options.ckpt_path == "last" else Path(str(options.ckpt_path))


def resume_start(options: FinetuneConf, out_dir: Path) -> Path | None:
    """The saved start model of the finetune run `quant.finetune.ckpt_path` resumes, or None (nothing to
    resume: `last` in a directory with no finetune checkpoint starts from the beginning, as Lightning does)."""
    if options.epochs == 0 or not options.ckpt_path:
        return None
    ckpt = resume_checkpoint(options, out_dir)
    start = ckpt.parent / START
    if options.ckpt_path == "last":
        if not start.is_file():
            log.warning("quant.finetune.ckpt_path=last: %s holds no finetune checkpoint, so the run starts from the "
                        "beginning (to resume a run, pass its directory as hydra.run.dir=<run dir>)", out_dir)
            return None
        return start
    if not ckpt.is_file():
        raise FileNotFoundError(f"quant.finetune.ckpt_path={ckpt} does not exist; pass a .ckpt from a run's "
                                f"{FINETUNE_DIR}/ directory, or last with hydra.run.dir=<that run's directory>")
    if not start.is_file():
        raise FileNotFoundError(f"quant.finetune.ckpt_path={ckpt}: its start model {start} is missing (a finetune "
                                f"checkpoint resumes together with the {START} saved beside it)")
    return start


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
                 options: FinetuneConf) -> None:
        super().__init__()
        self.task, self.student, self.options, self.training_parts = task, student, options, training
        self.__dict__["teacher"] = teacher.eval()
        self.weights = {"task": options.task_weight, "kd": options.kd_weight, "feature": options.feature_weight}

    def on_fit_start(self) -> None:
        for model in (self.student, self.teacher):
            model.to(self.device)  # a model's own .to (mmengine's keeps its preprocessor's device in step)
        self.teacher.eval()

    def on_train_epoch_start(self) -> None:
        self.student.train(self.options.train_mode)

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
        total = max(1, int(self.trainer.estimated_stepping_batches))  # per process, after DDP set-up
        warm = total * o.warmup_epochs // max(1, o.epochs)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))

        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}


class EpochLoader(DataLoader):
    """The training loader: each pass first fixes its epoch, which sets the sampler's order and the random
    state (augmentation, dropout, worker seeds) from (seed, epoch, rank) alone.

    Lightning creates the first iterator of a run before it announces the epoch to the sampler, and of a
    resumed run before it restores its loop state, so the first pass takes `first_epoch` (the epoch the
    run starts at) and later ones read the training loop's epoch (`epoch_of`) when iteration starts.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, first_epoch: int, epoch_of: Callable[[], int],
                 **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed), **kwargs)
        self.seed, self.first_epoch, self.epoch_of = seed, first_epoch, epoch_of

    def __iter__(self):  # noqa: ANN204
        epoch = int(self.first_epoch if self.first_epoch is not None else self.epoch_of())
        self.first_epoch = None
        self.sampler.set_epoch(epoch)
        seed_everything(self.seed * 1_000_003 + epoch * 1009 + rank_world()[0], verbose=False)
        return super().__iter__()


@dataclass
class FinetuneData:
    train: EpochLoader
    val: DataLoader | None


def finetune_data(ctx: RunContext, options: FinetuneConf, trainer: L.Trainer, first_epoch: int) -> FinetuneData:
    """Training images (shuffled per epoch, equal shares per process) and the held-out validation images
    (whole batches per process, none repeated)."""
    train_set, val_set = ctx.task.finetune_split(options.val_samples, options.seed)
    world = processes(trainer)
    batch = int(options.batch_size or ctx.run.task.get("batch_size") or 32)
    if len(train_set) // world < 1:
        raise ValueError(f"finetuning: {len(train_set)} training images left after holding out "
                         f"quant.finetune.val_samples={options.val_samples} cannot give each of {world} processes one; "
                         "lower quant.finetune.val_samples")
    common = dict(collate_fn=ctx.task.collate_fn(), num_workers=int(ctx.run.task.get("num_workers") or 0))
    train = EpochLoader(train_set, batch, options.seed, first_epoch,
                        lambda: trainer.fit_loop.epoch_progress.current.processed, **common)
    val = None
    if len(val_set):
        val = sharded(DataLoader(val_set, batch_size=batch, shuffle=False, **common), world,
                      "the finetune validation loader")
    return FinetuneData(train, val)


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
    checkpoint = ModelCheckpoint(dirpath=str(folder), filename="epoch{epoch}", auto_insert_metric_name=False,
                                 save_last="link", save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = ctx.make_trainer(max_epochs=options.epochs, callbacks=[checkpoint], enable_checkpointing=True,
                               use_distributed_sampler=False, gradient_clip_val=options.grad_clip,
                               check_val_every_n_epoch=1)
    resume_ckpt = resume_checkpoint(options, ctx.out_dir) if resuming else None
    if resume_ckpt is not None and not resume_ckpt.is_file():  # `last` before a first epoch ended: from the start
        resume_ckpt = None
    data = finetune_data(ctx, options, trainer, first_epoch=resumed_epoch(resume_ckpt) if resume_ckpt else 0)
    world = processes(trainer)
    steps = math.ceil(len(data.train.dataset) // world / data.train.batch_size)
    trainer.log_every_n_steps = max(1, min(50, steps // 4))  # a few points per epoch, even in short ones
    training = QuantTraining(ctx.qmodel, weights=options.weights, zero_points=options.zero_points)
    module = FinetuneModule(ctx.task, ctx.qmodel, ctx.fp_model, training, options)
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
            log.error("finetune stopped; resume from its last epoch with the same overrides plus "
                      "quant.finetune.ckpt_path=last hydra.run.dir=%s", ctx.out_dir)
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
