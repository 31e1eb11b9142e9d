"""Observers: collect statistics during calibration and turn them into a quantization range.

Every observer keeps its state as a small dict of tensors and declares how each entry merges across
processes (min, max, sum, mean or concatenation). `merge_` folds another observer into this one and
`sync_` does the same across a torch.distributed group, so after calibration every rank derives
identical quantization parameters: the parameters one process gets over the same batches. Observers
whose result depends on batch order (EMA, per-batch quantiles) keep one column per batch, tagged with
the batch's global index (`vitq.distributed.global_batch`), and fold the columns in that order; token
reservoirs draw each batch's keys from its global index and keep the sample in key order.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..distributed import all_gather, all_reduce, global_batch, rank_world
from ..registry import Registry
from .quantizers import Grid

Reduce = str  # "min" | "max" | "sum" | "mean" | "cat"


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View x as [C, N] (per-channel) or [1, N] (per-tensor)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis % x.dim(), 0).reshape(x.shape[axis % x.dim()], -1)


class Observer:
    """Base class: per-tensor (axis=None) or per-channel statistics over calibration batches."""

    reductions: dict[str, Reduce] = {}

    def __init__(self, axis: int | None = None, channel_axis: int = -1) -> None:
        self.axis = axis  # per-channel axis, None per tensor
        self.channel_axis = channel_axis if axis is None else axis  # the layout's channel (token sampling)
        self.state: dict[str, torch.Tensor] = {}
        self.merged = 1  # how many observers were folded in (for "mean" entries)
        self.shard: tuple[int, int] | None = None  # (rank, world) of the batches observed; None: torch.distributed's
        self._local = 0  # batches observed here since the last reset

    @property
    def empty(self) -> bool:
        return not self.state

    def reset(self) -> None:
        self.state, self.merged, self._local = {}, 1, 0

    def _next_batch(self) -> int:
        """The global index (one process's batch order) of the batch being observed: a rank sees whole
        batches `rank, rank + world, ...` (`vitq.distributed.BatchShards`)."""
        rank, world = self.shard or rank_world()
        self._local += 1
        return global_batch(self._local - 1, rank, world)

    def _append_batch(self, **stats: torch.Tensor) -> None:
        """Record one batch's statistics (each [C]) as a column under its global index (`batch`)."""
        first = next(iter(stats.values()))
        new = {"batch": torch.tensor([self._next_batch()], dtype=torch.long, device=first.device),
               **{k: v.unsqueeze(-1) for k, v in stats.items()}}
        self.state = new if self.empty else {k: torch.cat([self.state[k], new[k]], -1) for k in new}

    def _in_batch_order(self) -> dict[str, torch.Tensor]:
        """The per-batch columns sorted by global batch index: one process's order, however sharded."""
        order = self.state["batch"].argsort(stable=True)
        return {k: v[..., order] for k, v in self.state.items() if k != "batch"}

    def observe(self, x: torch.Tensor) -> None:
        self._update(_channels_first(x, self.axis))

    def _update(self, x: torch.Tensor) -> None:  # x: [C, N]
        raise NotImplementedError

    def range(self, quantizer: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fit(self, quantizer: Grid) -> None:
        """Set the quantizer's parameters from the statistics (most observers: through a range)."""
        quantizer.set_range(*self.range(quantizer))

    def merge_(self, other: "Observer") -> "Observer":
        """Fold another observer's state into this one, as if it had seen the other's data too."""
        if other.empty:
            return self
        if self.empty:
            self.state = {k: v.clone() for k, v in other.state.items()}
            self.merged = other.merged
            return self
        for key, how in self.reductions.items():
            a, b = self.state[key], other.state[key]
            self.state[key] = {
                "min": lambda: torch.minimum(a, b),
                "max": lambda: torch.maximum(a, b),
                "sum": lambda: a + b,
                "mean": lambda: (a * self.merged + b * other.merged) / (self.merged + other.merged),
                "cat": lambda: torch.cat([a, b], dim=-1),
            }[how]()
        self.merged += other.merged
        self._after_merge()
        return self

    def _after_merge(self) -> None:
        """Restore invariants a plain merge of the entries breaks (e.g. a sample's size cap)."""

    def sync_(self, group=None) -> "Observer":  # noqa: ANN001
        """Merge state across all ranks of a process group (no-op outside torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size(group)
        if world == 1:
            return self
        if self.empty:
            raise RuntimeError("observer saw no data on this rank; every rank needs calibration batches")
        for key, how in self.reductions.items():
            t = self.state[key].clone()  # calibration may have run under inference_mode
            if how == "cat":
                sizes = all_gather(torch.tensor([t.shape[-1]]), group)
                width = int(max(s.item() for s in sizes))
                parts = all_gather(torch.nn.functional.pad(t, (0, width - t.shape[-1])), group)
                self.state[key] = torch.cat([p[..., : int(s.item())] for p, s in zip(parts, sizes)], -1)
            else:
                op = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}.get(how, dist.ReduceOp.SUM)
                all_reduce(t, op, group)
                self.state[key] = t / world if how == "mean" else t
        self.merged *= world
        self._after_merge()
        return self


def amin_amax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ([1]) or per-channel ([C]) min and max, reducing in place of the strided input: a
    reshape of a non-contiguous activation (q, k, v after permute) would copy it on every batch."""
    x = x.detach()
    if axis is None:
        lo, hi = torch.aminmax(x)
        return lo.float().reshape(1), hi.float().reshape(1)
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return x.amin(dim=dims).float(), x.amax(dim=dims).float()


class MinMaxObserver(Observer):
    """Running minimum and maximum."""

    reductions = {"min": "min", "max": "max"}

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = amin_amax(x, self.axis)
        if self.empty:
            self.state = {"min": lo, "max": hi}
        else:
            self.state["min"] = torch.minimum(self.state["min"], lo)
            self.state["max"] = torch.maximum(self.state["max"], hi)

    def range(self, quantizer: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        return self.state["min"], self.state["max"]


class EMAObserver(Observer):
    """Min/max smoothed across batches: v <- (1 - momentum) v + momentum * batch (FQ-ViT uses 0.01).

    Each batch's min and max are kept (a column per batch) and smoothed in global batch order when the
    range is taken, so N processes give exactly what one process gives over the same batches.
    """

    reductions = {"batch": "cat", "min": "cat", "max": "cat"}

    def __init__(self, axis: int | None = None, channel_axis: int = -1, momentum: float = 0.01) -> None:
        super().__init__(axis, channel_axis)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = amin_amax(x, self.axis)
        self._append_batch(min=lo, max=hi)

    def range(self, quantizer: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        cols, m = self._in_batch_order(), self.momentum
        lo, hi = cols["min"][..., 0], cols["max"][..., 0]
        for i in range(1, cols["min"].shape[-1]):
            lo = (1 - m) * lo + m * cols["min"][..., i]
            hi = (1 - m) * hi + m * cols["max"][..., i]
        return lo, hi


def _kth_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise quantile of a [C, N] tensor by kthvalue (no size limit, unlike torch.quantile)."""
    n = x.shape[1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return x.kthvalue(k, dim=1).values


def tail_quantiles(x: torch.Tensor, quantiles: tuple[float, ...]) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """Row-wise (1 - q, q) quantile pairs of a [C, N] tensor, interpolating linearly between order
    statistics as torch.quantile does (without its size limit). Only the tails are ordered (two topk of
    the few values beyond the widest candidate), not the whole row."""
    n = x.shape[1]
    k = min(n, int(math.ceil((1.0 - min(quantiles)) * (n - 1))) + 2)
    top = x.topk(k, dim=1).values  # top[:, j] is the (n - 1 - j)-th smallest
    bottom = x.topk(k, dim=1, largest=False).values  # bottom[:, j] is the j-th smallest

    def order(i: int) -> torch.Tensor:
        return bottom[:, i] if i < k else top[:, n - 1 - i]

    def quantile(q: float) -> torch.Tensor:
        pos = q * (n - 1)
        below, frac = int(pos), pos - int(pos)
        lo = order(below)
        return lo if frac == 0.0 or below + 1 >= n else lo + frac * (order(below + 1) - lo)

    return {q: (quantile(1.0 - q), quantile(q)) for q in quantiles}


class PercentileObserver(Observer):
    """Clip at the alpha / (1 - alpha) quantiles of each batch, averaged over batches.

    Each batch's quantiles are kept (a column per batch) and averaged in global batch order, so N
    processes give exactly what one process gives over the same batches (a sum of partial sums would
    round differently).
    """

    reductions = {"batch": "cat", "lo": "cat", "hi": "cat"}

    def __init__(self, axis: int | None = None, channel_axis: int = -1, alpha: float = 0.99999) -> None:
        super().__init__(axis, channel_axis)
        if not 0.5 < alpha <= 1.0:
            raise ValueError(f"percentile alpha must be in (0.5, 1], got {alpha}")
        self.alpha = alpha

    def _update(self, x: torch.Tensor) -> None:
        self._append_batch(lo=_kth_quantile(x, 1.0 - self.alpha), hi=_kth_quantile(x, self.alpha))

    def range(self, quantizer: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        cols = self._in_batch_order()
        return cols["lo"].mean(-1), cols["hi"].mean(-1)


OBSERVERS: Registry[Callable[..., Observer]] = Registry("observer", "a method can add one with register_observer")
for _name, _factory in {"minmax": MinMaxObserver, "ema": EMAObserver, "percentile": PercentileObserver}.items():
    OBSERVERS.register(_name, _factory)  # the sample-based ones (omse, quantile, PTF's) in sample_observers.py


def make_observer(name: str, axis: int | None = None, channel_axis: int = -1, **kwargs) -> Observer:  # noqa: ANN003
    return OBSERVERS.get(name)(axis=axis, channel_axis=channel_axis, **kwargs)


def register_observer(name: str, factory: Callable[..., Observer]) -> None:
    """Let a method add its own observer (e.g. a search) under a name recipes can use."""
    OBSERVERS.register(name, factory)


# Observers fit grids, grids know nothing of observers. A grid that needs an observer of its own (PTF's
# factor search, a method's grid) registers a factory (grid, spec, axis, channel_axis) -> Observer under
# the grid's name; every other observed grid gets the calibrator the recipe names.
GRID_OBSERVERS: Registry[Callable[..., Observer]] = Registry("grid observer")


def observer_for(grid: Grid, spec: Any, axis: int | None, channel_axis: int) -> Observer | None:
    """The observer that calibrates `grid` as `spec` asks (None for a fixed grid, which needs no data)."""
    if not grid.observed:
        return None
    if grid.grid_name in GRID_OBSERVERS:
        return GRID_OBSERVERS.get(grid.grid_name)(grid, spec, axis, channel_axis)
    return make_observer(spec.observer, axis=axis, channel_axis=channel_axis, **dict(spec.observer_args))
