"""The finetune stage's data: a training order and random state fixed by (seed, epoch, position) alone.

Each epoch's order is a permutation fixed by (seed, epoch) (`EpochShuffle`); each training sample's
augmentation draws from a generator seeded by (seed, epoch, index) (`SeededSamples`), and each step's
forward from (seed, epoch, step, rank) (`FinetuneModule.on_train_batch_start`). The loader is stateful
for Lightning (`state_dict` / `load_state_dict`, saved in every checkpoint): a run resumed from a step
checkpoint skips the batches the epoch already trained on, without loading them, and the rest of the
epoch draws exactly what the uninterrupted run drew, whatever the number of data workers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything
from torch.utils.data import DataLoader, Dataset

from ..distributed import EpochShuffle, rank_world, sharded
from .context import RunContext, processes
from .schema import FinetuneConf


def step_seed(seed: int, epoch: int, position: int, rank: int = 0) -> int:
    """One seed per (seed, epoch, position, rank), below 2**63."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 10_000_019 + int(position)) * 1009 + int(rank)


class SeededSamples(Dataset):
    """A dataset whose sample `i` is drawn under generators seeded by (seed, epoch, i): its augmentation
    depends on nothing else (not on the samples before it, the worker that loads it or a skipped start).
    torch's, Python's and NumPy's global generators are all seeded (timm's RandomErasing draws from
    Python's), and restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int) -> None:  # noqa: D107
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:  # noqa: ANN401
        seed = step_seed(self.seed, self.epoch, index)
        python, numpy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class EpochLoader(DataLoader):
    """The training loader: each pass first fixes its epoch, which sets the sampler's order, the samples'
    generators and the worker seeds from (seed, epoch, rank) alone.

    Lightning creates the first iterator of a run before it announces the epoch to the sampler, so the
    first pass takes `first_epoch` (the epoch the run starts at, or the one a mid-epoch checkpoint's loader
    state names) and later ones read the training loop's epoch (`epoch_of`) when iteration starts.
    `progress()` is the number of batches the current epoch has trained on (Lightning's loop), which the
    loader's state records for a resume from a step checkpoint.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, first_epoch: int, epoch_of: Callable[[], int],
                 progress: Callable[[], int] = lambda: 0, **kwargs: Any) -> None:
        super().__init__(SeededSamples(dataset, seed), batch_size=batch_size,
                         sampler=EpochShuffle(len(dataset), seed), **kwargs)  # type: ignore[arg-type]
        self.seed, self.first_epoch, self.epoch_of, self.progress = seed, first_epoch, epoch_of, progress
        self.epoch, self.skip = first_epoch, 0

    def __iter__(self):  # noqa: ANN204
        epoch = int(self.first_epoch if self.first_epoch is not None else self.epoch_of())
        self.first_epoch, self.epoch = None, epoch
        self.sampler.set_epoch(epoch)
        self.sampler.start, self.skip = self.skip * int(self.batch_size or 1), 0
        self.dataset.epoch = epoch
        seed_everything(self.seed * 1_000_003 + epoch * 1009 + rank_world()[0], verbose=False)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "batches": int(self.progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """A checkpoint taken mid-epoch: the first pass skips the batches already trained on (the loop's
        length stays the whole epoch, whose progress Lightning restores)."""
        if 0 < int(state["batches"]) < len(self):
            self.first_epoch, self.skip = int(state["epoch"]), int(state["batches"])


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
                        lambda: trainer.fit_loop.epoch_progress.current.processed,
                        lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed, **common)
    val = None
    if len(val_set):
        val = sharded(DataLoader(val_set, batch_size=batch, shuffle=False, **common), world,
                      "the finetune validation loader")
    return FinetuneData(train, val)
