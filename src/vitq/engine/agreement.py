"""Decisions every process of a run must share, taken on rank 0 and broadcast.

A file's presence is not a shared fact: a cache on node-local disk, a file still on its way through a
network file system, a damaged copy on one node. Ranks that decide by `path.is_file()` each can take
different branches, some entering collectives the others skip, and wait until the NCCL timeout. So rank 0
decides and every rank follows. Before any stage has started the process group (the float stage; a
`stage=test` run), Lightning starts it: a one-batch `Trainer.validate` broadcasts the decision (on a
plain machine that call also starts the other ranks, which re-run the command up to the same point).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from ..distributed import broadcast_object, rank_world
from .context import processes

T = TypeVar("T")


class _Broadcast(L.LightningModule):
    def __init__(self, value: Any) -> None:  # noqa: ANN401
        super().__init__()
        self.value = value

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: ANN401
        return None

    def on_validation_start(self) -> None:
        self.value = self.trainer.strategy.broadcast(self.value, src=0)


def decided_on_rank0(make_trainer: Callable[..., L.Trainer], decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 only, its (picklable) value returned on every rank."""
    if rank_world()[1] > 1:  # a stage started the process group already
        return broadcast_object(decide() if rank_world()[0] == 0 else None)
    trainer = make_trainer(use_distributed_sampler=False, logger=False)
    if processes(trainer) == 1:
        return decide()
    module = _Broadcast(decide() if rank_zero_only.rank == 0 else None)
    trainer.validate(module, dataloaders=DataLoader([0]), verbose=False)
    return module.value
