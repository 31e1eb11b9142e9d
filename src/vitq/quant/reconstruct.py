"""Block reconstruction: optimize each unit of a calibrated model so its quantized output matches the
float unit's output, one unit at a time, in model order.

    report = vitq.reconstruct(qmodel, fp_model, batches, run_batch, ReconstructOptions(adaround=True))

The driver (`vitq.pipeline.reconstruct`) takes the units from the model's adapters (`vitq.models.units`: patch embedding, blocks, Swin's merging
layers, head). For each unit, forward hooks record its inputs (positional and keyword arguments) and the
float unit's outputs on every calibration batch, stopping the forward right there; the records are kept
on the CPU, grouped by input form (batches of one padded image size form one group, so a detector's
calibration batches may differ in size), and streamed to the device a mini-batch at a time, each
mini-batch from one group, so memory holds about one unit's cache.
What is trained (AdaRound gates, LSQ activation steps, the float weights themselves) and where the unit's
inputs come from (the float model, the quantized model, or an element-wise random mix of both) are
options. The optimization itself is a pluggable `fit` callable: a plain loop by default; the engine runs
it through Lightning (`vitq.engine.reconstruct`), which also averages gradients across DDP ranks.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .modules import QuantWeight
from .points import Kind, QuantPoint
from .quantizers import UniformQuantizer
from .rounding import AdaRoundQuantizer, DropQuantizer, bake_rounding, make_fixed, make_learnable

INPUT_SOURCES = ("float", "quant", "mix")


@dataclass
class ReconstructOptions:
    """One reconstruction pass. Learning rates are Adam's, each decayed to 0 by a cosine over `iters`."""

    iters: int = 1000
    batch_size: int = 64  # samples per optimization step (per rank under DDP)
    input_source: str = "float"  # the unit's inputs: float | quant (the quantized model's) | mix (element-wise)
    mix_prob: float = 0.5  # mix: probability of taking the quantized model's input element
    adaround: bool = False  # learn each weight's rounding (up or down) on its calibrated grid
    adaround_lr: float = 1e-3
    reg_weight: float = 0.01  # lambda of the rounding regularizer
    beta: tuple[float, float] = (20.0, 2.0)  # regularizer exponent, annealed from first to second
    warmup: float = 0.2  # fraction of iterations without the regularizer
    lsq: bool = False  # learn the step of every uniform activation grid in the unit (LSQ)
    lsq_lr: float = 4e-5
    drop_prob: float = 0.0  # while optimizing, each activation element passes float with this probability
    tune_weights: bool = False  # train the float weights and biases of the unit's layers directly
    lr: float = 4e-5  # for tune_weights
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True  # a progress bar per unit (the plain loop; Lightning draws its own)

    def __post_init__(self) -> None:
        if self.input_source not in INPUT_SOURCES:
            raise ValueError(f"reconstruction input_source={self.input_source!r}: choose one of {INPUT_SOURCES}")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"reconstruction needs iters >= 1 and batch_size >= 1 (got {self.iters}, {self.batch_size})")
        for name in ("mix_prob", "drop_prob", "warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"reconstruction {name}={getattr(self, name)} must be in [0, 1]")
        if not (self.adaround or self.lsq or self.tune_weights):
            raise ValueError("reconstruction trains nothing: enable adaround, lsq or tune_weights")
        self.beta = tuple(float(b) for b in self.beta)


@dataclass
class UnitReport:
    """What one unit's optimization cost and achieved (losses on the cached calibration inputs)."""

    name: str
    seconds: float
    cache_mib: float
    peak_mib: float  # process RSS peak (CPU) or CUDA allocation peak during the unit
    loss_before: float
    loss_after: float
    params: int = 0  # trained tensors' elements
    groups: int = 1  # input forms cached (e.g. padded image sizes among the calibration batches)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _flat(out: Any) -> list[torch.Tensor]:
    """A unit's output as a list of tensors (a tensor, or a tuple/list/dict holding tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


class Rows:
    """Tensors of equal trailing shape read as one tensor concatenated along dim 0, without copying them
    into one (which would hold every record twice while it is made)."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        self.starts = torch.tensor([0, *[int(p.shape[0]) for p in parts]]).cumsum(0)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.starts[-1]), *self.parts[0].shape[1:]))

    def is_floating_point(self) -> bool:
        return self.parts[0].is_floating_point()

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def index_select(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the concatenation, in that order (exactly `torch.cat(parts).index_select(0, index)`)."""
        if len(self.parts) == 1:
            return self.parts[0].index_select(0, index)
        which = torch.searchsorted(self.starts, index, right=True) - 1
        out = self.parts[0].new_empty((len(index), *self.parts[0].shape[1:]))
        for k in which.unique().tolist():
            at = (which == k).nonzero().squeeze(1)
            out[at] = self.parts[k].index_select(0, index[at] - self.starts[k])
        return out


class _Group:
    """Calls of one form: their batch tensors (read as concatenated along dim 0) and one layout."""

    def __init__(self, layout: Any, shapes: list[tuple], n_tensors: int) -> None:
        self.layout, self.shapes = layout, shapes
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(n_tensors)]
        self.tensors: list[Rows] = []
        self.size = 0

    def matches(self, layout: Any, shapes: list[tuple]) -> bool:
        return shapes == self.shapes and _same(layout, self.layout)


def _same(a: Any, b: Any) -> bool:
    """Equal argument layouts: the same structure, equal values, equal non-batch tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return a is b


class ArgCache:
    """Calls of one module recorded over many batches, on the CPU, grouped by form.

    Tensors whose first dimension is the batch are the per-sample records; everything else (e.g. mmdet's
    `hw_shape`) is the call's layout. Calls whose batch tensors have the same shapes past the batch axis
    and whose layouts are equal form one group, whose batch tensors read as one along dim 0 (`Rows`).
    Batches of one image size make one group; a detector's calibration batches padded to different sizes
    make one group per size, each replayed with its own layout. `order` is the group of every call."""

    def __init__(self) -> None:
        self.groups: list[_Group] = []
        self.order: list[int] = []

    def add(self, args: tuple, kwargs: dict, batch: int) -> int:
        """Record one call; returns the index of its group."""
        found: list[torch.Tensor] = []

        def scan(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
                found.append(x.detach().to("cpu", copy=True))
                return _Slot(len(found) - 1)
            if isinstance(x, (list, tuple)):
                return type(x)(scan(v) for v in x)
            if isinstance(x, dict):
                return {k: scan(v) for k, v in x.items()}
            return x.detach().cpu() if isinstance(x, torch.Tensor) else x

        layout = (scan(tuple(args)), scan(dict(kwargs)))
        shapes = [(tuple(t.shape[1:]), t.dtype) for t in found]
        index = next((i for i, g in enumerate(self.groups) if g.matches(layout, shapes)), None)
        if index is None:
            index = len(self.groups)
            self.groups.append(_Group(layout, shapes, len(found)))
        group = self.groups[index]
        for part, t in zip(group.parts, found):
            part.append(t)
        group.size += batch
        self.order.append(index)
        return index

    def finish(self) -> None:
        for g in self.groups:
            g.tensors = [Rows(p) for p in g.parts]
            g.parts = []

    @property
    def sizes(self) -> list[int]:
        return [g.size for g in self.groups]

    def nbytes(self) -> int:
        return sum(t.nbytes() for g in self.groups for t in g.tensors)

    def get(self, index: torch.Tensor, device: torch.device, other: "ArgCache | None" = None,
            mix: float = 0.0, group: int = 0) -> tuple[tuple, dict]:
        """The arguments of the samples `index` of one group, on `device`; with `other`, each element is
        taken from `other` (the quantized model's inputs, grouped alike) with probability `mix`."""
        g = self.groups[group]
        tensors = [t.index_select(index).to(device, non_blocking=True) for t in g.tensors]
        if other is not None:
            for i, t in enumerate(tensors):
                if t.is_floating_point():
                    o = other.groups[group].tensors[i].index_select(index).to(device, non_blocking=True)
                    tensors[i] = torch.where(torch.rand_like(t) < mix, o, t)

        def fill(x: Any) -> Any:
            if isinstance(x, _Slot):
                return tensors[x.i]
            if isinstance(x, (list, tuple)):
                return type(x)(fill(v) for v in x)
            if isinstance(x, dict):
                return {k: fill(v) for k, v in x.items()}
            return x.to(device) if isinstance(x, torch.Tensor) else x

        args, kwargs = g.layout
        return fill(args), fill(kwargs)


@dataclass(frozen=True)
class _Slot:
    i: int


def _batch_size(args: tuple, kwargs: dict) -> int:
    for x in [*args, *kwargs.values()]:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            return int(x[0].shape[0])
    raise RuntimeError("a reconstruction unit was called without a tensor argument; cannot cache its inputs")


@dataclass
class UnitData:
    """One unit's cached calibration records: float inputs, quantized-model inputs, float outputs, in
    groups of one input form (one group per padded image size; see `ArgCache`)."""

    fp_in: ArgCache | None = None
    q_in: ArgCache | None = None
    fp_out: list[list[Rows]] = field(default_factory=list)  # per group: the float output tensors

    @property
    def sizes(self) -> list[int]:
        """Samples per group."""
        return (self.fp_in if self.fp_in is not None else self.q_in).sizes

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def nbytes(self) -> int:
        caches = [c for c in (self.fp_in, self.q_in) if c is not None]
        return sum(c.nbytes() for c in caches) + sum(t.nbytes() for g in self.fp_out for t in g)


@torch.no_grad()
def capture(fp_model: nn.Module, fp_unit: nn.Module, qmodel: nn.Module | None, q_unit: nn.Module | None,
            batches: Iterable[Any], run_batch: Callable[[nn.Module, Any], Any], device: torch.device,
            want_fp_inputs: bool) -> UnitData:
    """Run the calibration batches up to the unit (and no further) and record what it sees."""
    data = UnitData(fp_in=ArgCache() if want_fp_inputs else None, q_in=ArgCache() if q_unit is not None else None)
    outs: list[list[torch.Tensor]] = []

    def fp_pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if data.fp_in is not None:
            data.fp_in.add(args, kwargs, _batch_size(args, kwargs))

    def fp_post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        outs.append([t.detach().to("cpu", copy=True) for t in _flat(out)])
        raise _Stop

    def q_pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        data.q_in.add(args, kwargs, _batch_size(args, kwargs))
        raise _Stop

    hooks = [fp_unit.register_forward_pre_hook(fp_pre, with_kwargs=True),
             fp_unit.register_forward_hook(fp_post, with_kwargs=True)]
    if q_unit is not None:
        hooks.append(q_unit.register_forward_pre_hook(q_pre, with_kwargs=True))
    try:
        for batch in batches:
            batch = _to(batch, device)
            for model in (fp_model, qmodel) if qmodel is not None else (fp_model,):
                try:
                    run_batch(model, batch)
                except _Stop:
                    continue
                raise RuntimeError("the calibration forward never reached the reconstruction unit; check that "
                                   "run_batch runs the model's forward")
    finally:
        for h in hooks:
            h.remove()
    if not outs:
        raise RuntimeError("reconstruction got no calibration batches")
    order = (data.fp_in if data.fp_in is not None else data.q_in).order
    if data.fp_in is not None and data.q_in is not None and data.fp_in.order != data.q_in.order:
        raise RuntimeError("the float and the quantized model called a reconstruction unit with inputs of "
                           "different forms on the same batch")
    for g in range(max(order) + 1):
        parts = [outs[i] for i, k in enumerate(order) if k == g]
        if any(len(p) != len(parts[0]) or [t.shape[1:] for t in p] != [t.shape[1:] for t in parts[0]]
               for p in parts):
            raise RuntimeError("a reconstruction unit gave outputs of different forms for inputs of one form")
        data.fp_out.append([Rows(list(ts)) for ts in zip(*parts)])
    del outs
    for c in (data.fp_in, data.q_in):
        if c is not None:
            c.finish()
    return data


def _weight_layers(unit: nn.Module) -> list[nn.Module]:
    return [m for m in unit.modules() if isinstance(m, QuantWeight)]


def _activation_points(unit: nn.Module) -> list[QuantPoint]:
    return [p for p in unit.modules() if isinstance(p, QuantPoint) and p.kind != Kind.WEIGHT
            and p.configured and p.mode == "quant"]


class UnitObjective(nn.Module):
    """The unit, the things trained in it, and the loss of one optimization step.

    Building it swaps the trainable grids in (AdaRound on weight points, activation drop); `finish()`
    bakes and swaps them back. The cached records are plain attributes (not buffers), so moving this
    module to a device, or wrapping it in DDP, leaves them on the CPU.
    """

    def __init__(self, unit: nn.Module, data: UnitData, options: ReconstructOptions) -> None:
        super().__init__()
        self.unit, self.options = unit, options
        self.__dict__["data"] = data
        self._grad_flags = {p: p.requires_grad for p in unit.parameters()}
        for p in unit.parameters():
            p.requires_grad_(False)
        self.roundings: list[tuple[nn.Module, AdaRoundQuantizer]] = []
        self.lsq_grids: list[UniformQuantizer] = []
        self.drops: list[tuple[QuantPoint, DropQuantizer]] = []
        self.groups: list[dict[str, Any]] = []
        o = options
        if o.adaround:
            for layer in _weight_layers(unit):
                point = layer.weight_quantizer
                if point.mode == "quant" and type(point.quantizer) is UniformQuantizer:
                    rounding = AdaRoundQuantizer(point.quantizer, layer.weight)
                    point.quantizer = rounding
                    self.roundings.append((layer, rounding))
            if self.roundings:
                self.groups.append({"params": [r.alpha for _, r in self.roundings], "lr": o.adaround_lr})
        if o.tune_weights:
            params = [p for layer in _weight_layers(unit) for p in (layer.weight, layer.bias) if p is not None]
            for p in params:
                p.requires_grad_(True)
            if params:
                self.groups.append({"params": params, "lr": o.lr})
        if o.lsq:
            for point in _activation_points(unit):
                if type(point.quantizer) is UniformQuantizer and not point.quantizer.learnable:
                    self.lsq_grids.append(point.quantizer)
            if self.lsq_grids:
                self.groups.append({"params": [make_learnable(g) for g in self.lsq_grids], "lr": o.lsq_lr})
        if o.drop_prob > 0:
            for point in _activation_points(unit):
                drop = DropQuantizer(point.quantizer, 1.0 - o.drop_prob)
                point.quantizer = drop
                self.drops.append((point, drop))
        self.n_params = sum(p.numel() for g in self.groups for p in g["params"])

    @property
    def trains(self) -> bool:
        return bool(self.groups)

    def optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = torch.optim.Adam(self.groups, weight_decay=self.options.weight_decay)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.options.iters, eta_min=0.0)

    def sample(self, step: int, rank: int = 0) -> tuple[int, torch.Tensor]:
        """The group and the sample indices (within it) of one step: fixed by (seed, step, rank), so a
        resumed or repeated run draws the same batches, and ranks draw different ones. A mini-batch comes
        from one group (one input form); the group is drawn with probability proportional to its size, so
        every cached sample is equally likely. With one group the draw is a plain permutation."""
        g = torch.Generator().manual_seed(self.options.seed * 1_000_003 + step * 1009 + rank)
        sizes = self.data.sizes
        group = 0 if len(sizes) == 1 else int(torch.multinomial(torch.tensor(sizes, dtype=torch.float), 1,
                                                                 generator=g))
        n = sizes[group]
        return group, torch.randperm(n, generator=g)[: min(self.options.batch_size, n)]

    def inputs(self, index: torch.Tensor, device: torch.device, train: bool, group: int = 0) -> tuple[tuple, dict]:
        d, o = self.data, self.options
        if o.input_source == "float":
            return d.fp_in.get(index, device, group=group)
        if o.input_source == "quant":
            return d.q_in.get(index, device, group=group)
        if train:
            return d.fp_in.get(index, device, other=d.q_in, mix=o.mix_prob, group=group)
        return d.q_in.get(index, device, group=group)  # what the unit sees at inference

    def error(self, index: torch.Tensor, device: torch.device, train: bool = True, group: int = 0) -> torch.Tensor:
        """Squared error of the unit's outputs against the float outputs on samples `index` of `group`,
        summed over the channel (last) axis and averaged over everything else, summed over the unit's
        output tensors."""
        args, kwargs = self.inputs(index, device, train, group)
        outs = _flat(self.unit(*args, **kwargs))
        targets = [t.index_select(index).to(device, non_blocking=True) for t in self.data.fp_out[group]]
        return sum((o.float() - t.float()).pow(2).sum(-1).mean() for o, t in zip(outs, targets))

    def regularizer(self, step: int) -> torch.Tensor | None:
        """The rounding regularizer with beta annealed after the warm-up (None during the warm-up)."""
        o = self.options
        if not self.roundings or step < o.warmup * o.iters:
            return None
        start = o.warmup * o.iters
        t = (step - start) / max(o.iters - start, 1)
        beta = o.beta[1] + (o.beta[0] - o.beta[1]) * max(0.0, 1.0 - t)
        return o.reg_weight * sum(r.regularizer(beta) for _, r in self.roundings)

    def loss(self, step: int, device: torch.device, rank: int = 0) -> torch.Tensor:
        group, index = self.sample(step, rank)
        loss = self.error(index, device, group=group)
        reg = self.regularizer(step)
        return loss if reg is None else loss + reg

    @torch.no_grad()
    def evaluate(self, device: torch.device, batch: int = 256) -> float:
        """Mean error over every cached sample, as the unit computes at inference (hard rounding, no drop)."""
        for layer in _weight_layers(self.unit):
            layer._wcache = None  # the weight cache does not track the rounding gates
        for _, r in self.roundings:
            r.hard = True
        keeps = [(d, d.keep) for _, d in self.drops]
        for d, _ in keeps:
            d.keep = 1.0
        was = self.unit.training
        self.unit.eval()
        try:
            total = 0.0
            for group, n in enumerate(self.data.sizes):
                for i in range(0, n, batch):
                    index = torch.arange(i, min(i + batch, n))
                    total += float(self.error(index, device, train=False, group=group)) * len(index)
            return total / self.data.size
        finally:
            self.unit.train(was)
            for layer in _weight_layers(self.unit):
                layer._wcache = None
            for _, r in self.roundings:
                r.hard = False
            for d, keep in keeps:
                d.keep = keep

    @torch.no_grad()
    def finish(self) -> None:
        """Bake the rounding into the weights, fix the learned steps, remove the drop, restore grad flags."""
        for layer, rounding in self.roundings:
            bake_rounding(layer, rounding)
        for point, drop in self.drops:
            point.quantizer = drop.grid
        for grid in self.lsq_grids:
            make_fixed(grid)
        for layer in _weight_layers(self.unit):
            layer._wcache = None
        for p, flag in self._grad_flags.items():
            p.requires_grad_(flag)
        self.roundings, self.drops, self.lsq_grids = [], [], []


def plain_fit(objective: UnitObjective, device: torch.device, name: str) -> None:
    """The optimization without Lightning: Adam, cosine decay, `iters` steps."""
    opt, sched = objective.optimizer()
    steps: Iterable[int] = range(objective.options.iters)
    progress = None
    if objective.options.progress:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(f"reconstruct {name}", total=objective.options.iters)
    objective.unit.train()
    try:
        for step in steps:
            loss = objective.loss(step, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress.update(task, advance=1)
    finally:
        objective.unit.eval()
        if progress is not None:
            progress.stop()


class PeakMemory:
    """Peak memory while a block runs: the CUDA allocator's peak on a GPU, else the process's resident
    set sampled every 20 ms (the unit's cache, the model and the optimizer state all count)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        except OSError:
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


Fit = Callable[[UnitObjective, torch.device, str], None]


__all__ = ["ArgCache", "INPUT_SOURCES", "PeakMemory", "ReconstructOptions", "Rows", "UnitData", "UnitObjective",
           "UnitReport", "capture", "plain_fit"]
