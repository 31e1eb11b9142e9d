"""Data-parallel sharding that keeps one process's batches (calibration and evaluation under DDP).

Rank r of N takes the global batches r, r + N, r + 2N, ... of an unshuffled loader, whole and without
padding: every rank runs batches one process would run (the same samples, the same batch boundaries)
and together they hold every sample once. Results that depend on batch order (an EMA over batches,
per-batch quantiles, the keys of a token reservoir, per-sample outcomes) are put back in one process's
order from the global index `k * N + r` of rank r's k-th batch.

Every collective vitq runs goes through the functions below (`all_reduce`, `broadcast`, `all_gather`,
`broadcast_object`), on the device the process group's backend takes: NCCL takes CUDA tensors only,
gloo CPU tensors, and vitq's tensors sit wherever the model last was (Lightning moves the LightningModule
back to the CPU after each `validate` / `test` / `fit`). A collective runs on a copy staged on
`collective_device()` and copies the result back into the caller's tensor. One rule, decided here,
whatever backend Lightning or the user picked (`nccl`, `gloo`, or a mixed `cpu:gloo,cuda:nccl`).
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler


def collective_device(group=None) -> torch.device:  # noqa: ANN001
    """CUDA (the current device) for an NCCL-only group, the CPU for gloo, mpi, ucc or a mixed group
    (which carries a CPU backend)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def stage(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous copy of `t` on `device`, owned by the collective (never `t` itself)."""
    return t.detach().to(device=device, copy=True).contiguous()


def empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a collective."""
    return torch.empty(shape, dtype=dtype, device=device)


def all_reduce(t: torch.Tensor, op: Any = dist.ReduceOp.SUM, group=None) -> torch.Tensor:  # noqa: ANN001
    """`t` reduced over the group, in place (and returned)."""
    buf = stage(t, collective_device(group))
    dist.all_reduce(buf, op=op, group=group)
    with torch.no_grad():
        t.copy_(buf)
    return t


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:  # noqa: ANN001
    """`t` replaced by the group's rank `src` value (a group rank), in place (and returned)."""
    buf = stage(t, collective_device(group))
    source = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast(buf, src=source, group=group)
    with torch.no_grad():
        t.copy_(buf)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:  # noqa: ANN001
    """Every rank's `t` (same shape on every rank), on `t`'s device, in rank order."""
    device = collective_device(group)
    buf = stage(t, device)
    parts = [empty(buf.shape, buf.dtype, device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, buf, group=group)
    return [p.to(t.device) for p in parts]


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:  # noqa: ANN001, ANN401
    """Rank `src`'s picklable `obj` on every rank (its tensors arrive on the CPU)."""
    box = [obj]
    source = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast_object_list(box, src=source, group=group, device=collective_device(group))
    return box[0]


def rank_world(group=None) -> tuple[int, int]:  # noqa: ANN001
    """(rank, world size) in torch.distributed, (0, 1) outside it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def global_batch(local: int, rank: int, world: int) -> int:
    """The index, in one process's order, of rank `rank`'s `local`-th batch."""
    return local * world + rank


def num_batches(size: int, batch_size: int, drop_last: bool = False) -> int:
    return size // batch_size if drop_last else math.ceil(size / batch_size)


class _ShardSampler(DistributedSampler):
    """A DistributedSampler by type only, so that Lightning keeps it instead of injecting its own (which
    pads shards with repeated samples). Rank and world size are read when iterated: the process group
    starts after the loader is built (subclasses skip `DistributedSampler.__init__`, which needs it)."""

    @property
    def rank(self) -> int:  # type: ignore[override]
        return rank_world()[0]

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return rank_world()[1]


class BatchShards(_ShardSampler):
    """Sample indices of the whole batches `rank, rank + world, ...`, never padded."""

    shuffle, seed, epoch = False, 0, 0  # what code that inspects a DistributedSampler looks for

    def __init__(self, size: int, batch_size: int, drop_last: bool = False) -> None:  # noqa: D107
        self.size, self.batch_size, self.drop_last = int(size), int(batch_size), bool(drop_last)

    def _batches(self) -> range:
        rank, world = rank_world()
        return range(rank, num_batches(self.size, self.batch_size, self.drop_last), world)

    def __iter__(self) -> Iterator[int]:
        for b in self._batches():
            yield from range(b * self.batch_size, min((b + 1) * self.batch_size, self.size))

    def __len__(self) -> int:
        return sum(min((b + 1) * self.batch_size, self.size) - b * self.batch_size for b in self._batches())

    def set_epoch(self, epoch: int) -> None:
        """Unshuffled: every epoch is the same."""


class EpochShuffle(_ShardSampler):
    """Training order for (data-parallel) finetuning: a permutation fixed by (seed, epoch), cut to a multiple
    of the process count so that every rank runs the same number of steps, rank r taking every N-th index.

    The order depends on nothing but the seed and the epoch, so a run resumed at an epoch boundary sees
    the batches an uninterrupted run sees; `start` (reset by each pass) skips the first indices of this
    rank's share, for a run resumed mid-epoch (`len` stays the whole share).
    """

    shuffle = True

    def __init__(self, size: int, seed: int) -> None:  # noqa: D107
        self.size, self.seed, self.epoch, self.start = int(size), int(seed), 0, 0

    def __iter__(self) -> Iterator[int]:
        rank, world = rank_world()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.size // world * world]
        start, self.start = self.start, 0
        return iter(order[rank::world][start:].tolist())

    def __len__(self) -> int:
        return self.size // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


def sharded(loader: DataLoader, world: int, what: str) -> DataLoader:
    """`loader` with a `BatchShards` sampler when `world > 1` (unchanged otherwise).

    Needs an unshuffled loader with a batch size: anything else cannot reproduce one process's batches,
    and is refused rather than silently calibrated or counted differently.
    """
    if world <= 1:
        return loader
    if loader.batch_size is None or not isinstance(loader.sampler, (SequentialSampler, BatchShards)):
        raise ValueError(
            f"{what}: data-parallel runs need an unshuffled loader with a batch size (DataLoader(dataset, "
            f"batch_size=..., shuffle=False)), got sampler {type(loader.sampler).__name__} and batch_sampler "
            f"{type(loader.batch_sampler).__name__}; build the task's loader that way, or run on one device")
    size = len(loader.dataset)  # type: ignore[arg-type]
    batches = num_batches(size, loader.batch_size, loader.drop_last)
    if batches < world:
        raise ValueError(
            f"{what}: {size} samples in batches of {loader.batch_size} make {batches} batch(es), fewer than the "
            f"{world} processes; every process needs a batch: lower the batch size or run on fewer devices")
    extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers} \
        if loader.num_workers > 0 else {}
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=BatchShards(size, loader.batch_size, loader.drop_last), num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator, **extra)


def shard_or_replicate(loader: DataLoader, world: int, what: str) -> tuple[DataLoader, bool]:
    """(`sharded(loader)`, False), or (`loader`, True) when it has fewer whole batches than processes:
    every process then runs every batch (a paper's 32 calibration images in one batch on 8 GPUs), which
    gives one process's statistics with nothing to merge (`vitq.calibrate(..., whole_set=True)`)."""
    if world > 1 and loader.batch_size is not None and \
            num_batches(len(loader.dataset), loader.batch_size, loader.drop_last) < world:  # type: ignore[arg-type]
        return loader, True
    return sharded(loader, world, what), False


def _all_gather_rows(t: torch.Tensor, group=None) -> list[torch.Tensor]:  # noqa: ANN001
    """Every rank's `t` (same trailing shape, any number of rows), padded for the collective and cut back."""
    sizes = all_gather(torch.tensor([t.shape[0]], device=t.device), group)
    rows = int(max(int(s) for s in sizes))
    padded = torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))]) if rows > t.shape[0] else t
    return [p[: int(s)] for p, s in zip(all_gather(padded, group), sizes)]


def gather_batches(parts: list[torch.Tensor], group=None) -> list[torch.Tensor]:  # noqa: ANN001
    """All ranks' per-batch tensors (rank r's k-th is global batch k * N + r), in one process's order.

    Every rank gets the same list. Tensors share their trailing shape; the first dimension is the batch.
    Outside torch.distributed, `parts` itself.
    """
    rank, world = rank_world(group)
    if world == 1:
        return list(parts)
    device = parts[0].device if parts else torch.device("cpu")
    sizes = torch.tensor([p.shape[0] for p in parts], dtype=torch.long, device=device)
    counts = _all_gather_rows(sizes, group)
    if any(len(c) == 0 for c in counts):  # every rank sees it, so none waits in the next collective
        raise RuntimeError("a process ran no batch; every process needs at least one: shard the loader with "
                           "vitq.distributed.sharded, which refuses fewer batches than processes")
    values = _all_gather_rows(torch.cat(parts), group)
    per_rank = [list(v.split(c.tolist())) for v, c in zip(values, counts)]
    ordered = []
    for k in range(max(len(c) for c in counts)):
        ordered.extend(per_rank[r][k] for r in range(world) if k < len(per_rank[r]))
    return ordered


def check_same_on_ranks(tensors: dict[str, torch.Tensor], what: str, group=None) -> None:  # noqa: ANN001
    """Raise on every rank unless every rank holds exactly rank 0's `tensors` (same names, same values).

    Calibration merges statistics so that ranks agree; this proves it for each run instead of trusting
    that every search is deterministic on every device.
    """
    rank, world = rank_world(group)
    if world == 1 or not tensors:
        return
    names = sorted(tensors)
    flat = torch.cat([tensors[n].detach().reshape(-1).double() for n in names])
    n = all_reduce(torch.tensor([flat.numel(), -flat.numel()], dtype=torch.long), dist.ReduceOp.MAX, group)
    if int(n[0]) != -int(n[1]):
        raise RuntimeError(f"{what}: processes hold different numbers of values ({-int(n[1])} to {int(n[0])}); "
                           "every process must build the same model and recipe")
    differs = flat != broadcast(flat.clone(), 0, group)
    bad = all_reduce(torch.tensor([int(differs.any())]), dist.ReduceOp.MAX, group)
    if int(bad):
        sizes = [tensors[n].numel() for n in names]
        first = [n for n, d in zip(names, differs.split(sizes)) if bool(d.any())]
        raise RuntimeError(f"{what}: process {rank} differs from process 0"
                           + (f" in {', '.join(first[:5])}" if first else " (in another process)")
                           + "; the merged calibration statistics should make them identical: report this with the "
                             "recipe and the device")
