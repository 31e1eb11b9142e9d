"""Block reconstruction: optimize each unit of a calibrated model so its quantized output matches the
float unit's output, one unit at a time, in model order.

    report = vitq.reconstruct(qmodel, fp_model, batches, run_batch, ReconstructOptions(adaround=True))

The driver (`vitq.pipeline.reconstruct`) takes the units from the model's adapters (`vitq.models.units`:
patch embedding, blocks, Swin's merging layers, head). For each unit, forward hooks record its inputs
(positional and keyword arguments) and the float unit's outputs on every calibration batch, stopping the
forward right there (`records.record_unit`); the records are kept on the CPU, grouped by input form
(batches of one padded image size form one group, so a detector's calibration batches may differ in
size), and streamed to the device a mini-batch at a time, each
mini-batch from one group, so memory holds about one unit's cache.
What is trained (AdaRound gates, LSQ activation steps, the float weights themselves) and where the unit's
inputs come from (the float model, the quantized model, or an element-wise random mix of both) are
options. The optimization itself is a pluggable `fit` callable: a plain loop by default; the engine runs
it through Lightning (`vitq.engine.reconstruct`), which also averages gradients across DDP ranks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .modules import QuantWeight
from .points import Kind, QuantPoint
from .quantizers import UniformQuantizer
from .records import UnitData, flat_tensors
from .rounding import AdaRoundQuantizer, DropQuantizer, bake_rounding, make_fixed, make_learnable

INPUT_SOURCES = ("float", "quant", "mix")


@dataclass
class ReconstructOptions:
    """One reconstruction pass. Learning rates are Adam's, decayed to 0 by a cosine over `iters`, except
    the rounding gates', which stay constant (`adaround_schedule`)."""

    iters: int = 1000
    batch_size: int = 64  # samples per optimization step (per rank under DDP)
    input_source: str = "float"  # the unit's inputs: float | quant (the quantized model's) | mix (element-wise)
    mix_prob: float = 0.5  # mix: probability of taking the quantized model's input element
    adaround: bool = False  # learn each weight's rounding (up or down) on its calibrated grid
    adaround_lr: float = 1e-3
    # constant: Adam at adaround_lr throughout, as QDrop's and BRECQ's code (their rounding optimizer has
    # no scheduler); cosine: decayed with the other groups
    adaround_schedule: str = "constant"
    reg_weight: float = 0.01  # lambda of the rounding regularizer
    beta: tuple[float, float] = (20.0, 2.0)  # regularizer exponent, annealed from first to second
    warmup: float = 0.2  # fraction of iterations without the regularizer
    lsq: bool = False  # learn the step of every uniform activation grid in the unit (LSQ)
    lsq_lr: float = 4e-5
    drop_prob: float = 0.0  # while optimizing, each activation element passes float with this probability
    tune_weights: bool = False  # train the float weights and biases of the unit's layers directly
    lr: float = 4e-5  # for tune_weights
    weight_decay: float = 0.0
    # the squared error is summed over the channels (last axis; BRECQ's and QDrop's `lp_loss` on NCHW
    # feature maps) or over the tokens (the axes between batch and channels: their `lp_loss`, `.sum(1)`,
    # applied to [B, N, C] tokens, as I&S-ViT's code does), and averaged over the rest
    loss_sum: str = "channels"
    seed: int = 0
    # a step's mini-batch: permutation, batch_size distinct samples (BRECQ's and I&S-ViT's
    # `randperm(n)[:batch_size]`) | replacement, batch_size independent draws (QDrop's `randint(0, n, ...)`)
    draw: str = "permutation"
    progress: bool = True  # a progress bar per unit (the plain loop; Lightning draws its own)

    def __post_init__(self) -> None:
        if self.input_source not in INPUT_SOURCES:
            raise ValueError(f"reconstruction input_source={self.input_source!r}: choose one of {INPUT_SOURCES}")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"reconstruction needs iters >= 1 and batch_size >= 1 (got {self.iters}, {self.batch_size})")
        for name in ("mix_prob", "drop_prob", "warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"reconstruction {name}={getattr(self, name)} must be in [0, 1]")
        if self.loss_sum not in ("channels", "tokens"):
            raise ValueError(f"reconstruction loss_sum={self.loss_sum!r}: choose channels or tokens")
        if self.draw not in ("permutation", "replacement"):
            raise ValueError(f"reconstruction draw={self.draw!r}: choose permutation (BRECQ, I&S-ViT) or replacement "
                             "(QDrop)")
        if self.adaround_schedule not in ("constant", "cosine"):
            raise ValueError(f"reconstruction adaround_schedule={self.adaround_schedule!r}: choose constant or cosine")
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


def _weight_layers(unit: nn.Module) -> list[nn.Module]:
    return [m for m in unit.modules() if isinstance(m, QuantWeight)]


def _activation_points(unit: nn.Module) -> list[QuantPoint]:
    return [p for p in unit.modules() if isinstance(p, QuantPoint) and p.kind != Kind.WEIGHT
            and p.configured and p.mode == "quant"]


def squared_error(out: torch.Tensor, target: torch.Tensor, summed: str) -> torch.Tensor:
    """`channels`: summed over the last axis; `tokens`: over the axes between the batch and the last (the
    last itself for a [B, C] tensor); then averaged over the remaining axes."""
    e = (out.float() - target.float()).pow(2)
    if summed == "channels" or e.dim() <= 2:
        return e.sum(-1).mean()
    return e.sum(dim=tuple(range(1, e.dim() - 1))).mean()


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
                self.groups.append({"params": [r.alpha for _, r in self.roundings], "lr": o.adaround_lr,
                                    "cosine": o.adaround_schedule == "cosine"})
        if o.tune_weights:
            params = [p for layer in _weight_layers(unit) for p in (layer.weight, layer.bias) if p is not None]
            for p in params:
                p.requires_grad_(True)
            if params:
                self.groups.append({"params": params, "lr": o.lr, "cosine": True})
        if o.lsq:
            for point in _activation_points(unit):
                if type(point.quantizer) is UniformQuantizer and not point.quantizer.learnable:
                    self.lsq_grids.append(point.quantizer)
            if self.lsq_grids:
                self.groups.append({"params": [make_learnable(g) for g in self.lsq_grids], "lr": o.lsq_lr,
                                    "cosine": True})
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
        """Adam over the groups; a cosine to 0 over `iters` on the groups marked `cosine`, the others constant."""
        groups = [{k: v for k, v in g.items() if k != "cosine"} for g in self.groups]
        opt = torch.optim.Adam(groups, weight_decay=self.options.weight_decay)
        iters = self.options.iters

        def cosine(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, iters) / iters))

        factors = [cosine if g["cosine"] else (lambda step: 1.0) for g in self.groups]
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factors)

    def sample(self, step: int, rank: int = 0) -> tuple[int, torch.Tensor]:
        """The group and the sample indices (within it) of one step: fixed by (seed, step, rank), so a
        resumed or repeated run draws the same batches, and ranks draw different ones. A mini-batch comes
        from one group (one input form); the group is drawn with probability proportional to its size, so
        every cached sample is equally likely. Within the group, `draw` takes distinct samples (the first of
        a permutation) or independent ones."""
        g = torch.Generator().manual_seed(self.options.seed * 1_000_003 + step * 1009 + rank)
        sizes = self.data.sizes
        group = 0 if len(sizes) == 1 else int(torch.multinomial(torch.tensor(sizes, dtype=torch.float), 1,
                                                                 generator=g))
        n = sizes[group]
        if self.options.draw == "replacement":
            return group, torch.randint(0, n, (self.options.batch_size,), generator=g)
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
        summed over the channels or the tokens (`loss_sum`) and averaged over everything else, summed over
        the unit's output tensors."""
        args, kwargs = self.inputs(index, device, train, group)
        outs = flat_tensors(self.unit(*args, **kwargs))
        targets = [t.index_select(index).to(device, non_blocking=True) for t in self.data.fp_out[group]]
        return sum(squared_error(o, t, self.options.loss_sum) for o, t in zip(outs, targets))

    def regularizer(self, step: int) -> torch.Tensor | None:
        """The rounding regularizer with beta annealed after the warm-up (None during the warm-up), on the
        1-based count of QDrop's and BRECQ's LossFunction (which increments before use), so the last step
        ends at beta[1]."""
        o = self.options
        count, start = step + 1, o.warmup * o.iters
        if not self.roundings or count < start:
            return None
        t = (count - start) / max(o.iters - start, 1)
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


Fit = Callable[[UnitObjective, torch.device, str], None]


__all__ = ["INPUT_SOURCES", "Fit", "ReconstructOptions", "UnitObjective", "UnitReport", "plain_fit"]
