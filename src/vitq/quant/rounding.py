"""What block reconstruction trains, as reversible swaps on quant points.

- `AdaRoundQuantizer` replaces a weight point's uniform grid while a unit is optimized: each weight
  rounds down or up by a learned soft gate (Nagel et al., 2020); `bake_rounding` then writes the hard
  decisions into the weight, so plain rounding on the original grid reproduces those codes exactly.
- `DropQuantizer` wraps an activation grid: each element keeps its quantized value with probability p,
  else passes the float value. It exists only while a unit is optimized, so evaluation never drops.
- `make_learnable` / `make_fixed` switch a uniform grid's scale to an LSQ parameter and back.
"""
from __future__ import annotations

import torch
from torch import nn

from .quantizers import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)


class AdaRoundQuantizer(nn.Module):
    """Soft rounding of one fixed weight on a calibrated uniform grid.

    x_int = floor(W / s) + h(V), h = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1); V starts where h equals
    the fractional part of W / s, so the soft weight starts at the float weight (inside the clip range).
    `hard` uses h = [V >= 0]. Only V is trained; the weight and the grid stay fixed.
    """

    def __init__(self, grid: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.grid = grid
        w = weight.detach()
        scale, zp = grid._shape(grid.scale, w), grid._shape(grid.zero_point, w)
        ratio = w / scale
        floor = torch.floor(ratio)
        rest = ratio - floor  # in [0, 1): the logit below is finite there (BRECQ's and QDrop's init_alpha)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zp.detach().clone())
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def gate(self) -> torch.Tensor:
        if self.hard:
            return (self.alpha >= 0).to(self.floor.dtype)
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + self.gate() + self.zero_point, self.grid.qmin, self.grid.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: the (fixed) weight; the gate decides
        return (self.codes() - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every gate is exactly 0 or 1."""
        h = torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()


class DropQuantizer(nn.Module):
    """Keep the wrapped grid's quantized value with probability `keep`, element-wise, else the float value."""

    def __init__(self, grid: nn.Module, keep: float) -> None:
        super().__init__()
        self.grid, self.keep = grid, float(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.grid(x)
        if self.keep >= 1.0:
            return xq
        return torch.where(torch.rand_like(x) < self.keep, xq, x)


@torch.no_grad()
def bake_rounding(layer: nn.Module, rounding: AdaRoundQuantizer) -> torch.Tensor:
    """Write the hard rounding decisions into `layer.weight` (as dequantized values on the grid) and put
    the plain grid back on the weight point; returns the integer codes."""
    rounding.hard = True
    codes = rounding.codes()
    layer.weight.copy_((codes - rounding.zero_point) * rounding.scale)
    layer.weight_quantizer.quantizer = rounding.grid
    layer._wcache = None
    return codes


def make_learnable(grid: UniformQuantizer) -> nn.Parameter:
    """Turn the grid's scale into a trainable LSQ parameter (its forward then takes the LSQ path)."""
    return grid.make_learnable()[0]


def make_fixed(grid: UniformQuantizer) -> None:
    """Back to a buffer: the trained scale stays, the grid's inference path returns."""
    grid.make_fixed()


__all__ = ["AdaRoundQuantizer", "DropQuantizer", "bake_rounding", "make_fixed", "make_learnable"]
