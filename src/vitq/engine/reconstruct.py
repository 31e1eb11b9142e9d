"""The `reconstruct` stage: the method's reconstruction passes, each unit optimized through `trainer.fit`.

Each unit becomes a `UnitFit` (manual optimization: Adam and the objective's schedule over `iters` steps) fitted
over an index dataset of `iters` step numbers; a step draws its mini-batch from the unit's cached records
(one group of one input size) by (seed, step, rank). Under DDP every rank captures the same calibration
records, draws a different mini-batch (possibly from another size group), and Lightning's DDP wrapper
averages the gradients, so parameters stay identical on every rank. Times, cache sizes and memory peaks
per unit go to the loggers and the result row.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..pipeline import reconstruct
from ..quant.reconstruct import UnitObjective, UnitReport
from .context import RunContext, register_stage

log = logging.getLogger(__name__)


class UnitFit(L.LightningModule):
    """One unit's optimization as a LightningModule (manual optimization)."""

    def __init__(self, objective: UnitObjective, name: str) -> None:
        super().__init__()
        self.objective, self.unit_name = objective, name
        self.automatic_optimization = False

    def training_step(self, step: Any, batch_idx: int) -> torch.Tensor:
        opt, sched = self.optimizers(), self.lr_schedulers()
        loss = self.objective.loss(int(step), self.device, rank=self.global_rank)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        sched.step()
        self.log("reconstruct/loss", loss.detach(), prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        opt, sched = self.objective.optimizer()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lightning_fit(make_trainer: Any):  # noqa: ANN201
    """A `fit` for `vitq.reconstruct` that runs each unit through a fresh trainer from `make_trainer`."""

    def fit(objective: UnitObjective, device: torch.device, name: str) -> None:
        steps = DataLoader(range(objective.options.iters), batch_size=None, shuffle=False)
        trainer = make_trainer(max_epochs=1, max_steps=objective.options.iters, limit_val_batches=0,
                               use_distributed_sampler=False, logger=False)
        with warnings.catch_warnings():  # units run in eval mode on purpose: deterministic, no dropout
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            trainer.fit(UnitFit(objective, name), train_dataloaders=steps)

    return fit


def capture_device(ctx: RunContext) -> torch.device:
    """The device this rank's trainer computes on (the GPU of this rank under DDP, else the CPU)."""
    return ctx.make_trainer(logger=False).strategy.root_device


@register_stage("reconstruct")
def reconstruct_stage(ctx: RunContext) -> None:
    """Run the method's reconstruction passes on the calibrated model, unit by unit."""
    passes = ctx.method.reconstruct_passes(ctx.qmodel)
    if not passes:
        return
    module_cache: dict[int, Any] = {}

    def run_batch(model: torch.nn.Module, batch: Any) -> None:
        module = module_cache.setdefault(id(model), ctx.task.calibration_module(model))
        module.validation_step(batch, 0)

    device = capture_device(ctx)
    reports: list[dict] = []

    def on_unit(report: UnitReport) -> None:
        row = {"pass": len(done), **report.as_dict()}
        reports.append(row)
        log.info("reconstruct pass %d %s: %.1f s, cache %.1f MiB (%d input size(s)), peak %.0f MiB, error %.4g -> "
                 "%.4g", row["pass"], report.name, report.seconds, report.cache_mib, report.groups, report.peak_mib,
                 report.loss_before, report.loss_after)
        for lg in ctx.loggers:
            lg.log_metrics({f"reconstruct/{report.name}/seconds": report.seconds,
                            f"reconstruct/{report.name}/peak_mib": report.peak_mib,
                            f"reconstruct/{report.name}/error_before": report.loss_before,
                            f"reconstruct/{report.name}/error_after": report.loss_after}, step=len(reports))

    start = time.perf_counter()
    done: list[int] = []
    try:
        for index, options in enumerate(passes):
            ctx.method.before_pass(ctx.qmodel, index)
            reconstruct(ctx.qmodel, ctx.fp_model, ctx.calib_loader, run_batch, options, device=device,
                        fit=lightning_fit(ctx.make_trainer), on_unit=on_unit)
            done.append(index)
        ctx.method.after_reconstruct(ctx.qmodel)
    finally:
        ctx.qmodel.cpu(), ctx.fp_model.cpu()
    ctx.timings["reconstruct"] = time.perf_counter() - start
    ctx.info.update(reconstruct_seconds=round(ctx.timings["reconstruct"], 2),
                    reconstruct_peak_mib=max((r["peak_mib"] for r in reports), default=0.0),
                    reconstruct_passes=len(passes), reconstruct_iters=[p.iters for p in passes],
                    reconstruct_units=reports)
