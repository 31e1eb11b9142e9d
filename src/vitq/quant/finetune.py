"""What quantization-aware finetuning trains, as a reversible switch on a calibrated model.

Every uniform grid in `quant` mode learns its step (LSQ, Esser et al. 2020) and, where asymmetric, its
zero point (LSQ+, Bhalgat et al. 2020, kept on the integer grid by straight-through rounding); the
weights of the quantized layers train too when asked. Grids of other kinds (log2, power-of-two factor,
SULQ) keep their calibrated parameters and pass straight-through gradients. `finish()` turns the learned
parameters back into buffers (zero points rounded) and restores every `requires_grad` flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .modules import QuantWeight
from .points import QuantPoint
from .quantizers import UniformQuantizer


@dataclass
class Trainables:
    """The parameters finetuning trains, by role (each role gets its own learning rate)."""

    steps: list[nn.Parameter] = field(default_factory=list)
    zero_points: list[nn.Parameter] = field(default_factory=list)
    weights: list[nn.Parameter] = field(default_factory=list)

    def count(self) -> dict[str, int]:
        return {role: sum(p.numel() for p in params) for role, params in
                (("steps", self.steps), ("zero_points", self.zero_points), ("weights", self.weights))}


def learnable_grids(model: nn.Module) -> list[UniformQuantizer]:
    """The uniform grids of every quantized point (plain uniform only: other grids keep their own rule)."""
    return [p.quantizer for p in model.modules()
            if isinstance(p, QuantPoint) and p.configured and p.mode == "quant" and type(p.quantizer) is UniformQuantizer]


class QuantTraining:
    """Make a calibrated model's quantizer parameters (and optionally its weights) trainable."""

    def __init__(self, model: nn.Module, weights: bool = False, zero_points: bool = True) -> None:
        self.model = model
        self._flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.grids = learnable_grids(model)
        self.trainables = Trainables()
        for grid in self.grids:
            params = grid.make_learnable(zero_point=zero_points)
            self.trainables.steps.append(params[0])
            self.trainables.zero_points.extend(params[1:])
        if weights:
            layers = [m for m in model.modules() if isinstance(m, QuantWeight)]
            self.trainables.weights = [p for m in layers for p in (m.weight, m.bias) if p is not None]
            for p in self.trainables.weights:
                p.requires_grad_(True)
        if not self.trainables.steps and not self.trainables.weights:
            self.finish()
            raise ValueError("finetuning would train nothing: the recipe has no uniform quantizer in use (log2, PTF "
                             "and SULQ grids keep their calibration) and quant.finetune.weights=false; set "
                             "quant.finetune.weights=true or pick a recipe with uniform grids (e.g. quant=minmax)")

    @torch.no_grad()
    def finish(self) -> None:
        """Learned parameters back to buffers; weights keep their trained values; flags restored."""
        for grid in self.grids:
            grid.make_fixed()
        for m in self.model.modules():
            if isinstance(m, QuantWeight):
                m._wcache = None
        for p in self.model.parameters():
            p.requires_grad_(self._flags.get(p, False))
        self.grids = []


__all__ = ["QuantTraining", "Trainables", "learnable_grids"]
