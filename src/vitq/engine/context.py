"""What the stages share: the run context, and the registry the stages enter by name.

The stage modules (`stages`, `reconstruct`, `finetune`) import this one, never each other; `vitq.engine`
imports them all, so every stage is registered once the engine is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from ..methods import Method
from ..quant.recipe import Recipe
from ..registry import Registry
from .schema import RunConfig
from .tasks import Task


@dataclass
class RunContext:
    """Everything the stages share. `run` holds the checked settings; `recipe` is the recipe in force (a
    loaded checkpoint's, after `load`)."""

    run: RunConfig
    out_dir: Path
    task: Task
    recipe: Recipe
    method: Method
    make_trainer: Callable[..., L.Trainer]
    loggers: list[Logger]
    cache: Path
    fp_model: torch.nn.Module | None = None
    qmodel: torch.nn.Module | None = None
    float_source: str = ""
    float_key: str = ""
    checkpoint: dict | None = None  # a quantized checkpoint read at start-up (quant.from_checkpoint)
    checkpoint_path: str = ""  # where it came from
    resume_from: Path | None = None  # a finetune start model this run resumes from (quant.finetune.ckpt_path)
    resume_ckpt: Path | None = None  # and the Lightning checkpoint it resumes (None: from the first step)
    finetuned: bool = False
    calib_loader: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # extra columns of the result row
    artifacts: dict[str, Any] = field(default_factory=dict)  # files to write at the end (name -> writer)
    row: dict | None = None


Stage = Callable[[RunContext], None]
STAGES: Registry[Stage] = Registry("stage")


def register_stage(name: str) -> Callable[[Stage], Stage]:
    return STAGES.register(name)


def processes(trainer: L.Trainer) -> int:
    """How many processes a trainer's loops run in (each gets whole batches, `vitq.distributed.sharded`)."""
    return int(trainer.num_devices) * int(trainer.num_nodes)
