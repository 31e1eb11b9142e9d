"""The task registry and the contract every task meets.

A task brings its data, builds the float architecture, trains it when asked, and evaluates a model into
named metrics with per-sample outcomes (for paired confidence intervals). The engine looks tasks up by
name and never imports a task module: on the first lookup it loads the modules of the `vitq.tasks`
entry-point group (vitq's own `vitq.tasks.classification` and `vitq.tasks.coco`, and those other installed
packages declare), and each registers its tasks.
"""
from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from typing import Any, Callable, ClassVar, Mapping

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..distributed import gather_batches
from ..registry import Registry
from .checkpoints import load_checkpoint

log = logging.getLogger(__name__)


def _discover() -> None:
    """Load every module the `vitq.tasks` entry-point group names (vitq's own tasks are declared in its
    pyproject.toml); loading a task module registers its tasks."""
    found = entry_points(group="vitq.tasks")
    if not found:  # vitq's metadata declares none: an install from before tasks/ became vitq.tasks
        try:
            where = getattr(distribution("vitq"), "_path", "the installed metadata")
        except PackageNotFoundError:
            where = "nowhere (vitq is not installed)"
        log.warning("no vitq.tasks entry points are declared (vitq's metadata: %s); remove a vitq.egg-info left "
                    "in the project root by an older install and reinstall (`make setup` or `pip install -e .`)",
                    where)
    for ep in found:
        ep.load()


TASKS: Registry[type["Task"]] = Registry("task", "vitq's own load through the vitq.tasks entry points: if none is "
                                         "known, reinstall with `make setup` or `pip install -e .`; add one "
                                         "under tasks/ with @register_task, see docs/adding.md",
                                         discover=_discover)


def register_task(*names: str) -> Callable[[type["Task"]], type["Task"]]:
    """Class decorator: the task answers to `task.name=<name>` for each name given."""
    def add(cls: type[Task]) -> type[Task]:
        for name in names:
            TASKS.register(name, cls)
        return cls
    return add


def get_task(name: str) -> type["Task"]:
    return TASKS.get(name)


def hold_out(n: int, count: int, seed: int, what: str) -> tuple[list[int], list[int]]:
    """Indices 0..n-1 as (the rest, `count` held out), drawn by `seed`, each in ascending order: the
    finetune stage's training and validation samples (`what` names the split in the error)."""
    if not 0 <= count < n:
        raise ValueError(f"quant.finetune.val_samples={count} must be between 0 and {n - 1}: {what} holds {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[count:]), sorted(order[:count])


def distillation_kl(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the logits at `temperature`, times T^2 so that its gradient scale does not
    depend on T (Hinton et al., 2015); mean over the batch."""
    t = float(temperature)
    return torch.nn.functional.kl_div(torch.log_softmax(logits / t, -1), torch.log_softmax(target / t, -1),
                                      reduction="batchmean", log_target=True) * t * t


class EvalModule(L.LightningModule):
    """What `Trainer.test` runs for a task: keeps per-sample outcomes (the engine logs the metrics).

    Subclasses implement `outcomes(batch) -> {metric: tensor [batch]}`; a metric's value is the mean of
    its outcomes (x100 for percentages), so a paired bootstrap over samples gives its uncertainty. Under
    DDP each rank tests whole batches (`vitq.distributed.sharded`, no padded repeats) and the outcomes are
    gathered back in one process's order, so float and quantized outcomes pair sample by sample.
    """

    def __init__(self, model: nn.Module, prefix: str, metrics: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.prefix, self.metric_names = model, prefix, metrics
        self._outcomes: dict[str, list[torch.Tensor]] = {m: [] for m in metrics}
        self.samples: dict[str, torch.Tensor] = {}

    def forward(self, x: Any) -> Any:
        return self.model(x)

    def outcomes(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_test_epoch_start(self) -> None:
        self._outcomes = {m: [] for m in self.metric_names}

    def test_step(self, batch: Any, batch_idx: int) -> None:
        for name, values in self.outcomes(batch).items():
            self._outcomes[name].append(values.detach().float())

    def on_test_epoch_end(self) -> None:
        for name, parts in self._outcomes.items():  # every rank's batches, in one process's order
            gathered = gather_batches(parts)
            self.samples[name] = torch.cat(gathered).cpu() if gathered else torch.zeros(0)


class Task:
    """Base of every task. `cfg` is the Hydra `task` group, `model_cfg` the `model` group (plain dicts)."""

    metrics: ClassVar[tuple[str, ...]] = ()
    primary: ClassVar[str] = ""  # the metric a run returns and sweeps optimize
    # how to supply float weights when a run has none (named in the float stage's error)
    weights_hint: ClassVar[str] = ("set model.pretrained=true, model.checkpoint=/path/to/weights.pth, or "
                                   "task.fit.epochs>0 to train it here")

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
        self.cfg, self.model_cfg = dict(cfg), dict(model_cfg)

    def create_model(self, pretrained: bool) -> nn.Module:
        """The float architecture, with the model group's pretrained weights when asked."""
        raise NotImplementedError

    def load_weights(self, model: nn.Module, path: str) -> nn.Module:
        """Load `model.checkpoint` into the architecture (a state dict, strictly; tasks whose checkpoints
        come in other layouts convert them here)."""
        return load_checkpoint(model, path)

    def compare(self, fp: dict[str, Any], quant: dict[str, Any], metrics: tuple[str, ...]
                ) -> dict[str, tuple[float, float, float, float, float]]:
        """(fp, quant, delta, CI low, CI high) per metric from the two models' per-sample outcomes. The
        default suits metrics that are means of per-sample outcomes (a paired bootstrap over samples)."""
        from ..report.table import compare_means

        return compare_means(fp, quant, metrics)

    def identity(self) -> dict[str, Any]:
        """What, besides the model and fit settings, makes a float model trained here different."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The evaluation data, for the float-metrics cache and the logs."""
        raise NotImplementedError

    def calib_loader(self, num_samples: int, batch_size: int, seed: int) -> DataLoader:
        raise NotImplementedError

    def calibration_module(self, model: nn.Module) -> L.LightningModule:
        """A module whose `validation_step` runs the model forward on a calibration batch."""
        raise NotImplementedError

    def eval_module(self, model: nn.Module, prefix: str) -> EvalModule:
        raise NotImplementedError

    def test_loader(self) -> DataLoader:
        raise NotImplementedError

    def fit_module(self, model: nn.Module, fit: Mapping[str, Any]) -> L.LightningModule:
        """The module `trainer.fit` trains the float model with (tasks that train here)."""
        raise NotImplementedError(f"task {type(self).__name__} does not train float models here")

    def train_data(self) -> L.LightningDataModule:
        """The DataModule `trainer.fit` trains the float model on: its `train_dataloader` (Lightning adds
        its DistributedSampler under DDP). Without a `val_dataloader`: the float model is never validated
        on the evaluation samples."""
        raise NotImplementedError(f"task {type(self).__name__} does not train float models here")

    def collate_fn(self) -> Callable | None:
        """How the task's loaders batch samples (None: torch's default)."""
        return None

    # ---- quantization-aware finetuning (the `finetune` stage) -------------------------------------
    def finetune_split(self, val_samples: int, seed: int) -> tuple[Dataset, Dataset]:
        """Training samples for finetuning (with training augmentation), and `val_samples` others of the
        training split held out for its validation loop (evaluation transform). Never evaluation images."""
        raise NotImplementedError(f"task {type(self).__name__} does not support quantization-aware finetuning")

    def finetune_losses(self, student: nn.Module, teacher: nn.Module, batch: Any, temperature: float
                        ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch by name: `task` (the task's own loss), `kd` (logit distillation from
        the float `teacher`), `feature` (feature distillation); any other key is a metric, logged only."""
        raise NotImplementedError(f"task {type(self).__name__} does not support quantization-aware finetuning")

    def batch_len(self, batch: Any) -> int:
        """Samples in a batch (for weighting logged means)."""
        first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
        return len(first)
