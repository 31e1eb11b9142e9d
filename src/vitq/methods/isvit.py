"""I&S-ViT (Zhong et al., 2023): the shift-uniform-log2 quantizer (SULQ) for attention probabilities, and
three-stage smooth optimization (SOS) by block reconstruction.

SULQ: y = -log2(x + eta) is quantized uniformly over its calibrated range with exactly 2^b levels (codes
0 .. 2^b - 1), and dequantized as 2^round(-y_hat) - eta, so exponents stay integers (bit shifts). The shift
eta is the candidate of the published grid with the lowest L2 error on the calibration sample. (The
published code divides the range by 2^b and clamps at 2^b in its forward, i.e. 2^b + 1 levels; this grid
does not copy that.)

SOS, as passes of the `reconstruct` stage:
1. post-LayerNorm inputs (qkv, fc1, Swin's reduction) calibrated per channel, every other activation per
   tensor, weights float; the float weights and biases are tuned per unit against the float unit's
   output, with the float model's unit inputs;
2. the per-channel scales are folded into the LayerNorm and the next layer (RepQ-ViT's reparameterization,
   exact: the codes do not change), the weight grids are calibrated on the tuned weights;
3. with quantized weights, the weights are tuned again, with the quantized model's unit inputs and the
   float outputs as targets.
Quantizer parameters and LayerNorm affines stay frozen throughout. `quant.sulq=false` puts a uniform grid
at the attention probabilities; `quant.sos=false` keeps post-LayerNorm inputs per tensor and runs stage 3
alone (the paper's ablation: neither / SULQ only / SOS only / both).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..quant.ops import iter_points, refit_weight
from ..quant.modules import QuantWeight
from ..quant.observers import GRID_OBSERVERS
from ..quant.sample_observers import RangeSampleObserver
from ..quant.points import Kind, PointSpec
from ..quant.quantizers import Grid, check_bits, register_grid
from ..quant.reconstruct import ReconstructOptions
from .base import Method, register_method
from .repq import check_fold_zero_point, fold_post_norm_inputs, per_channel_post_norm_inputs

ETAS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)  # the published search grid


@register_grid("sulq")
class SULQuantizer(Grid):
    """Shift-uniform-log2 grid for attention probabilities: codes c = clamp(round((y - lo) / step), 0,
    2^b - 1) of y = -log2(x + eta), step = (hi - lo) / (2^b - 1); x_hat = 2^round(-(lo + c step)) - eta."""

    kinds = frozenset({Kind.SOFTMAX_OUTPUT})

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.qmax = 2**bits - 1  # 2^b levels: codes 0 .. 2^b - 1
        self.register_buffer("eta", torch.tensor([ETAS[0]]))
        self.register_buffer("lo", torch.zeros(1))  # log-domain range of -log2(x + eta)
        self.register_buffer("step", torch.ones(1))

    @classmethod
    def from_spec(cls, spec: PointSpec, axis: int | None, channel_axis: int) -> "SULQuantizer":
        return cls.per_tensor(spec, axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shift-uniform-log2, eta={float(self.eta):g}"

    def probe(self) -> "SULQuantizer":
        return SULQuantizer(self.bits)

    def export_params(self) -> dict:
        return {"grid": "sulq", "bits": self.bits, "eta": self.eta.clone(), "lo": self.lo.clone(),
                "step": self.step.clone(), "qmax": self.qmax}

    @torch.no_grad()
    def set_eta_range(self, eta: float, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """The log-domain range for shift eta from the data range [lo, hi] of x (y is decreasing in x)."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).min().clamp_min(0)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).max().clamp_min(0)
        y_lo, y_hi = -torch.log2(hi + eta), -torch.log2(lo + eta)
        dev = self.lo.device
        self.eta = torch.tensor([float(eta)], device=dev)
        self.lo = y_lo.reshape(1).to(dev)
        self.step = ((y_hi - y_lo) / self.qmax).clamp_min(1e-8).reshape(1).to(dev)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.set_eta_range(float(self.eta), lo, hi)

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        y = -torch.log2(x.clamp_min(0) + self.eta)
        return torch.round((y - self.lo) / self.step).clamp(0, self.qmax)

    def from_codes(self, q: torch.Tensor) -> torch.Tensor:
        return torch.exp2(torch.round(-(self.lo + q * self.step))) - self.eta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x)


class SULQObserver(RangeSampleObserver):
    """Min and max of the probabilities and a token sample; `fit` picks the shift eta with the lowest L2
    error on the sample (the first such candidate on ties). Merges exactly like the other observers."""

    def __init__(self, axis: int | None = None, channel_axis: int = -1, max_tokens: int | None = 2048,
                 etas: tuple[float, ...] = ETAS) -> None:
        super().__init__(None, channel_axis)
        self.max_tokens, self.etas = max_tokens, tuple(etas)

    @torch.no_grad()
    def errors(self, grid: SULQuantizer) -> list[float]:
        """The L2 error on the sample of every candidate shift, in the order of `etas`."""
        x = self.state["sample"].reshape(-1)
        probe = grid.probe().to(x.device)
        errs = []
        for eta in self.etas:
            probe.set_eta_range(eta, self.state["min"], self.state["max"])
            errs.append(float((probe(x) - x).pow(2).sum()))
        return errs

    @torch.no_grad()
    def fit(self, grid: SULQuantizer) -> None:
        errs = self.errors(grid)
        best = min(range(len(errs)), key=errs.__getitem__)
        grid.set_eta_range(self.etas[best], self.state["min"], self.state["max"])


GRID_OBSERVERS.register("sulq", lambda grid, spec, axis, channel_axis: SULQObserver(channel_axis=channel_axis))


@dataclasses.dataclass
class ISViTOptions:
    sulq: bool = True  # shift-uniform-log2 attention probabilities (false: uniform)
    sos: bool = True  # three-stage smooth optimization (false: per-tensor inputs, stage 3 alone)
    iters: Optional[int] = None  # per unit and pass; null: the paper's 1000 for W3/W4, 200 for W6 and above
    recon_batch_size: int = 64
    lr: float = 4e-5  # Adam, cosine decay to 0, no weight decay
    # the reconstruction error summed over the tokens (the code's `lp_loss`, `.sum(1).mean()` on [B, N, C]),
    # or over the channels (BRECQ's convention for feature maps)
    loss_sum: str = "tokens"
    fold_zero_point: str = "mean"  # stage 2's folded zero point: mean (unrounded, the code) | rounded (exact)

    def __post_init__(self) -> None:  # a bad value fails when the recipe is read
        check_fold_zero_point(self.fold_zero_point)


@register_method
class ISViT(Method):
    name = "isvit"
    grid_switches = {"sulq": "quant.sulq=false"}
    stages = ("calibrate", "reconstruct")
    Options = ISViTOptions

    def specs(self, specs: dict[str, PointSpec], scope: str) -> dict[str, PointSpec]:
        specs = dict(specs)
        if self.options.sulq and Kind.SOFTMAX_OUTPUT in specs:
            specs[Kind.SOFTMAX_OUTPUT] = dataclasses.replace(specs[Kind.SOFTMAX_OUTPUT], quantizer="sulq",
                                                             per_channel=False)
        return specs

    def prepare(self, model: nn.Module) -> None:
        if self.options.sos:
            per_channel_post_norm_inputs(model)

    def reconstruct_passes(self, model: nn.Module) -> list[ReconstructOptions]:
        o = self.options
        w = model.vitq.recipe.specs.get(Kind.WEIGHT)
        iters = o.iters if o.iters is not None else (200 if w is not None and w.bits >= 6 else 1000)
        stage3 = ReconstructOptions(iters=iters, batch_size=o.recon_batch_size, input_source="quant",
                                    tune_weights=True, lr=o.lr, loss_sum=o.loss_sum)
        if not o.sos:
            return [stage3]
        return [dataclasses.replace(stage3, input_source="float"), stage3]

    def before_pass(self, model: nn.Module, index: int) -> None:
        if not self.options.sos:
            return
        weights = [p for _, p in iter_points(model) if p.kind == Kind.WEIGHT]
        if index == 0:  # stage 1: float weights, quantized activations
            for p in weights:
                p.set_mode("off")
            return
        fold(model, self.options.fold_zero_point == "rounded")  # stage 2, then grids for the weights stage 1 tuned
        for module in model.modules():
            if isinstance(module, QuantWeight):
                refit_weight(module)
        for p in weights:
            p.set_mode("quant")


# SOS stage 2 is RepQ-ViT's reparameterization: with float weights the folded model computes the same
fold = fold_post_norm_inputs
