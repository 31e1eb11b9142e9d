"""Observers: collect statistics during calibration and turn them into a quantization range.

Every observer keeps its state as a small dict of tensors and declares how each entry merges across
processes (min, max, sum, mean or concatenation). `merge_` folds another observer into this one and
`sync_` does the same across a torch.distributed group, so after calibration every rank derives
identical quantization parameters.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .quantizers import UniformQuantizer

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

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.state: dict[str, torch.Tensor] = {}
        self.merged = 1  # how many observers were folded in (for "mean" entries)

    @property
    def empty(self) -> bool:
        return not self.state

    def reset(self) -> None:
        self.state, self.merged = {}, 1

    def observe(self, x: torch.Tensor) -> None:
        self._update(_channels_first(x, self.axis))

    def _update(self, x: torch.Tensor) -> None:  # x: [C, N]
        raise NotImplementedError

    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fit(self, quantizer: UniformQuantizer) -> None:
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
        return self

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
                sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
                dist.all_gather(sizes, torch.tensor([t.shape[-1]], device=t.device), group=group)
                width = int(max(s.item() for s in sizes))
                padded = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
                parts = [torch.empty_like(padded) for _ in range(world)]
                dist.all_gather(parts, padded, group=group)
                self.state[key] = torch.cat([p[..., : int(s.item())] for p, s in zip(parts, sizes)], -1)
            else:
                op = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}.get(how, dist.ReduceOp.SUM)
                dist.all_reduce(t, op=op, group=group)
                self.state[key] = t / world if how == "mean" else t
        self.merged *= world
        return self


def _amin_amax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
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
        lo, hi = _amin_amax(x, self.axis)
        if self.empty:
            self.state = {"min": lo, "max": hi}
        else:
            self.state["min"] = torch.minimum(self.state["min"], lo)
            self.state["max"] = torch.maximum(self.state["max"], hi)

    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        return self.state["min"], self.state["max"]


class EMAObserver(Observer):
    """Min/max smoothed across batches: v <- (1 - momentum) v + momentum * batch (FQ-ViT uses 0.01)."""

    reductions = {"min": "mean", "max": "mean"}

    def __init__(self, axis: int | None = None, momentum: float = 0.01) -> None:
        super().__init__(axis)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = _amin_amax(x, self.axis)
        if self.empty:
            self.state = {"min": lo, "max": hi}
            return
        m = self.momentum
        self.state["min"] = (1 - m) * self.state["min"] + m * lo
        self.state["max"] = (1 - m) * self.state["max"] + m * hi

    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        return self.state["min"], self.state["max"]


def _kth_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise quantile of a [C, N] tensor by kthvalue (no size limit, unlike torch.quantile)."""
    n = x.shape[1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return x.kthvalue(k, dim=1).values


class PercentileObserver(Observer):
    """Clip at the alpha / (1 - alpha) quantiles of each batch, averaged over batches.

    The average of per-batch quantiles (kept as a sum and a count) merges exactly across processes.
    """

    reductions = {"lo_sum": "sum", "hi_sum": "sum", "count": "sum"}

    def __init__(self, axis: int | None = None, alpha: float = 0.99999) -> None:
        super().__init__(axis)
        if not 0.5 < alpha <= 1.0:
            raise ValueError(f"percentile alpha must be in (0.5, 1], got {alpha}")
        self.alpha = alpha

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = _kth_quantile(x, 1.0 - self.alpha), _kth_quantile(x, self.alpha)
        one = torch.ones(1, device=x.device)
        if self.empty:
            self.state = {"lo_sum": lo, "hi_sum": hi, "count": one}
        else:
            self.state["lo_sum"] = self.state["lo_sum"] + lo
            self.state["hi_sum"] = self.state["hi_sum"] + hi
            self.state["count"] = self.state["count"] + one

    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.state["count"]
        return self.state["lo_sum"] / c, self.state["hi_sum"] / c


class OMSEObserver(Observer):
    """Shrink [min, max] by i% (i = 0..steps-1) and keep the clip with the lowest L2 error.

    The error is measured on a bounded sample of the observed values (strided, about
    `sample_per_batch` per channel and batch, the most recent `max_sample` kept); the sample is
    concatenated across processes, so every rank searches on the same data.
    """

    reductions = {"min": "min", "max": "max", "sample": "cat"}

    def __init__(
        self, axis: int | None = None, steps: int = 90, sample_per_batch: int = 65536, max_sample: int = 262144
    ) -> None:
        super().__init__(axis)
        self.steps, self.sample_per_batch, self.max_sample = steps, sample_per_batch, max_sample

    def _update(self, x: torch.Tensor) -> None:
        stride = max(1, x.shape[1] // self.sample_per_batch)
        sample = x[:, ::stride].clone()  # never a view of the caller's tensor
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        if self.empty:
            self.state = {"min": lo, "max": hi, "sample": sample}
            return
        self.state["min"] = torch.minimum(self.state["min"], lo)
        self.state["max"] = torch.maximum(self.state["max"], hi)
        self.state["sample"] = torch.cat([self.state["sample"], sample], 1)[:, -self.max_sample :]

    @torch.no_grad()
    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi, x = self.state["min"], self.state["max"], self.state["sample"]
        probe = _probe_quantizer(quantizer)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(self.steps):
            f = 1.0 - 0.01 * i
            probe.set_range(lo * f, hi * f)
            err = (probe(x) - x).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * f, best_lo)
            best_hi = torch.where(better, hi * f, best_hi)
        return best_lo, best_hi


def _probe_quantizer(quantizer: UniformQuantizer) -> UniformQuantizer:
    """A copy of the quantizer's grid laid out as [C, N] (channel axis 0) for search observers."""
    return UniformQuantizer(
        quantizer.bits, quantizer.symmetric, quantizer.signed, axis=0 if quantizer.per_channel else None
    )


class PTFObserver(Observer):
    """FQ-ViT's Power-of-Two Factor: the layer-wise range comes from an inner calibrator (minmax, ema,
    percentile or omse); each channel then takes the factor 2^alpha (alpha in 0..K) with the lowest L2
    error on a bounded sample of recent tokens (FQ-ViT searches on the last batch)."""

    reductions = {"sample": "cat"}

    def __init__(self, axis: int | None = -1, calibrator: str = "minmax", max_tokens: int = 2048,
                 **calibrator_args) -> None:  # noqa: ANN003
        super().__init__(-1 if axis is None else axis)
        if calibrator == "ptf":
            raise ValueError("PTF needs a layer-wise calibrator: minmax, ema, percentile or omse")
        self.inner = make_observer(calibrator, axis=None, **calibrator_args)
        self.max_tokens = max_tokens

    def reset(self) -> None:
        super().reset()
        self.inner.reset()

    def observe(self, x: torch.Tensor) -> None:
        self.inner.observe(x)
        x = x.detach()
        tokens = x.movedim(self.axis, -1).reshape(-1, x.shape[self.axis])  # a view when channels are last
        sample = tokens[-self.max_tokens :].t().float().clone()  # [C, T]: only the tokens kept are copied
        old = self.state.get("sample")
        self.state["sample"] = sample if old is None else torch.cat([old, sample], 1)[:, -self.max_tokens :]

    def merge_(self, other: "Observer") -> "Observer":
        self.inner.merge_(other.inner)  # type: ignore[attr-defined]
        return super().merge_(other)

    def sync_(self, group=None) -> "Observer":  # noqa: ANN001
        self.inner.sync_(group)
        return super().sync_(group)

    @torch.no_grad()
    def fit(self, quantizer) -> None:  # noqa: ANN001  (a PTFQuantizer)
        probe = UniformQuantizer(quantizer.bits, symmetric=False, signed=False)
        base, zp = quantizer.base_grid(*self.inner.range(probe))
        x = self.state["sample"]
        errors = []
        for a in range(quantizer.max_factor + 1):
            s = base * 2**a
            deq = (torch.clamp(torch.round(x / s) + zp, quantizer.qmin, quantizer.qmax) - zp) * s
            errors.append((deq - x).pow(2).sum(dim=1))
        alpha = torch.stack(errors).argmin(dim=0)  # ties: the finest scale
        quantizer.set_ptf(base, zp, alpha)


OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "omse": OMSEObserver,
}


def make_observer(name: str, axis: int | None = None, **kwargs) -> Observer:  # noqa: ANN003
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}: choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[name](axis=axis, **kwargs)


def register_observer(name: str, factory: Callable[..., Observer]) -> None:
    """Let a method add its own observer (e.g. a search) under a name recipes can use."""
    OBSERVERS[name] = factory
