"""NoisyQuant (Liu et al., CVPR 2023): a fixed noisy bias before the input quantizer of linear layers.

An add-on: `quant.noisy=true` stacks it on any recipe whose linear inputs use a uniform grid (minmax,
omse, repq, liu21, ...); `quant=noisyquant` is the paper's setting (symmetric per-tensor activations,
output-MSE clip search, then the noise). For each Linear whose input is quantized:

- a noise vector N = k * u * step, one value per input channel, is drawn once (seeded by `noisy_seed` and
  the layer's position) and kept in the checkpoint; u is the code's base noise `randn * 2 - 1` (Gaussian,
  mean -1, standard deviation 2) or, with `noisy_noise=uniform`, the paper's U(-1, 1);
- the input quantizer, whatever its grid, sees X + N (`NoisyGrid` wraps it);
- the denoising bias is folded offline, B' = B - q(W) N, so the layer computes
  q(W) q(X + N) + B - q(W) N and inference costs one addition;
- the amplitude k is searched per layer among `noisy_candidates` values in [0, noisy_range] (the code's
  ii / 1000, ii < 2000; k = 0, the plain quantizer, is a candidate and wins ties), minimizing the output
  MSE on the calibration tokens against q(W) x + B, the layer with quantized weights and float input (the
  code's target; `noisy_target=float`: the float layer's W x + B); with `noisy_clip` the input clip is
  searched first the same way, without noise: the step s * f for f in [noisy_clip_floor, 1]
  (`noisy_clip_candidates` values; the code's absmax * ii / 1000, ii = 1000 .. 1), ties keeping the wider.

Where a layer's searches take their tokens (`noisy_flow`): `sequential` (the code's two forwards, the
default) runs the calibration data through the quantized model again for each layer in module order: a
first round refits the input point on what the searched layers before it give and searches its clip, a
second searches its noise with the noise of the layers before it in place. `captured` records every
layer's input during the calibration forward and searches afterwards (one forward, no replay).

The paper's noise is uniform; the authors' released code, whose published numbers these are, draws
`randn * 2 - 1`. vitq follows the code by default (docs/methods.md, protocol card).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..quant.modules import QuantLinear
from ..quant.points import Kind, PointSpec, QuantPoint
from . import capture
from .base import Addon, register_addon

log = logging.getLogger(__name__)
_CHUNK_ELEMENTS = 2**24


@dataclass
class NoisyOptions:
    noisy: bool = False  # NoisyQuant: fixed noise before each linear input quantizer, bias folded
    noisy_seed: int = 0  # seed of the noise vectors (one per layer, drawn once)
    noisy_noise: str = "gaussian"  # base noise per channel: the code's randn * 2 - 1, or uniform U(-1, 1) (paper)
    noisy_candidates: int = 2000  # amplitudes tried per layer, linear in [0, noisy_range] (the code: ii / 1000)
    noisy_range: float = 1.999  # largest amplitude tried, a multiple of the base noise in input steps
    noisy_target: str = "quantized_weights"  # the searches' target: q(W) x + B (the code) or float (W x + B)
    noisy_clip: bool = False  # also search the input clip (output MSE, before the noise)
    noisy_clip_candidates: int = 1000  # clip factors tried, linear in [noisy_clip_floor, 1] x the calibrated step
    noisy_clip_floor: float = 0.001  # the smallest factor (the code: absmax / 1000)
    # how a clip candidate is scored: code (the input clamped to +-qmax s first, so the search never uses
    # code qmin, as fast_quant.py:43) or grid (the grid as inference applies it)
    noisy_clip_score: str = "code"
    noisy_samples: Optional[int] = None  # tokens per layer the searches score; null: every calibration token
    # where the searches' tokens come from: sequential (the code: the data replayed per layer, the layers before
    # it searched) or captured (recorded in the calibration forward, searched afterwards)
    noisy_flow: str = "sequential"


class NoisyGrid(nn.Module):
    """Wraps any input grid: forward is inner(x + noise), the noise broadcast along the channel axis.

    Attributes the wrapper lacks (scale, bits, set_params, ...) are the inner grid's, so code that reads a
    point's grid keeps working.
    """

    def __init__(self, inner: nn.Module, noise: torch.Tensor, channel_axis: int = -1) -> None:
        super().__init__()
        self.inner = inner
        self.channel_axis = channel_axis
        self.register_buffer("noise", noise.detach().clone().float())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__["_modules"].get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def shaped_noise(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis % x.dim()] = -1
        return self.noise.to(x.dtype).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + self.shaped_noise(x))

    def export_params(self) -> dict:
        return {**self.inner.export_params(), "noise": self.noise.detach().clone(), "noise_axis": self.channel_axis}

    def extra_repr(self) -> str:
        return f"noise amplitude {float(self.noise.abs().max()):.4g}"


@register_addon
class NoisyQuant(Addon):
    name = "noisyquant"
    switch = "noisy"
    Options = NoisyOptions

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        o = options
        if o.noisy_candidates < 2 or o.noisy_clip_candidates < 2:
            raise ValueError("quant.noisy_candidates and quant.noisy_clip_candidates must be at least 2")
        if not o.noisy_range > 0:
            raise ValueError(f"quant.noisy_range={o.noisy_range} must be positive (amplitude in input steps)")
        if not 0 < o.noisy_clip_floor <= 1:
            raise ValueError(f"quant.noisy_clip_floor={o.noisy_clip_floor} must be in (0, 1] (a fraction of the range)")
        if o.noisy_samples is not None and o.noisy_samples < 1:
            raise ValueError(f"quant.noisy_samples={o.noisy_samples} must be at least 1 (or null: every token)")
        if o.noisy_noise not in ("gaussian", "uniform"):
            raise ValueError(f"quant.noisy_noise={o.noisy_noise!r}: choose gaussian (the code) or uniform (the paper)")
        if o.noisy_target not in ("quantized_weights", "float"):
            raise ValueError(f"quant.noisy_target={o.noisy_target!r}: choose quantized_weights (the code) or float")
        if o.noisy_clip_score not in ("code", "grid"):
            raise ValueError(f"quant.noisy_clip_score={o.noisy_clip_score!r}: choose code or grid")
        if o.noisy_flow not in ("sequential", "captured"):
            raise ValueError(f"quant.noisy_flow={o.noisy_flow!r}: choose sequential (the code's forwards, layer by "
                             "layer) or captured (one calibration forward)")

    def specs(self, specs: dict[str, PointSpec], scope: str) -> dict[str, PointSpec]:
        spec = specs.get(Kind.LINEAR_INPUT)
        if spec is None:
            raise ValueError("quant.noisy=true adds noise before the linear-layer input quantizers, but this recipe "
                             "leaves linear inputs float: use a recipe that quantizes them (e.g. quant=minmax)")
        if spec.quantizer != "uniform":
            raise ValueError(f"quant.noisy=true needs a uniform grid at linear inputs (the noise amplitude is "
                             f"searched in input steps); this recipe puts {spec.quantizer!r} there: use a uniform "
                             "recipe (minmax, omse, percentile, repq, liu21)")
        return specs

    def calibrates_in_order(self) -> bool:
        return self.options.noisy_flow == "sequential"  # every process replays the whole set

    def prepare(self, model: nn.Module) -> None:
        if self.options.noisy_flow == "captured":
            capture.attach([m for _, m in noisy_layers(model)], 1 << 30, self.name,
                           keep_output=self.options.noisy_target == "float", max_tokens=self.options.noisy_samples)

    def after_freeze(self, model: nn.Module) -> None:
        if self.options.noisy_flow != "captured":
            return
        o = self.options
        try:
            for index, (name, layer) in enumerate(noisy_layers(model)):
                cap = capture.captured(layer, self.name, name)
                x = tokens(cap.args[0], o.noisy_samples, o.noisy_seed)
                y = tokens(cap.output, o.noisy_samples, o.noisy_seed) if o.noisy_target == "float" \
                    else quantized_weight_output(layer, x)
                if o.noisy_clip:
                    search_clip(layer, x, y, o.noisy_clip_candidates, o.noisy_clip_floor, o.noisy_clip_score == "code")
                self._search_noise(index, name, layer, x, y)
        finally:
            capture.detach_all(model, self.name)
        self._share(model)

    def replay(self, model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> None:
        """The code's two forwards, one layer at a time (its searches run inside the forward, on one batch):
        each layer's tokens are what the calibration data gives with the layers before it already final."""
        if self.options.noisy_flow != "sequential":
            return
        o, layers = self.options, noisy_layers(model)
        rounds = (["clip"] if o.noisy_clip else []) + ["noise"]
        total = len(rounds) * len(layers)
        for r, what in enumerate(rounds):  # a log line per replay (Lightning's bar, if any, shows each forward)
            for index, (name, layer) in enumerate(layers):
                log.info("noisyquant %s search %d/%d: %s", what, r * len(layers) + index + 1, total, name)
                seen = capture.replayed_input(model, layer, forward_loop, self.name, name)
                x = tokens(seen, o.noisy_samples, o.noisy_seed)
                y = quantized_weight_output(layer, x) if o.noisy_target != "float" else float_output(layer, x)
                if what == "clip":
                    refit(layer.input_quantizer, seen)  # the code: the clip range from the input's absmax
                    search_clip(layer, x, y, o.noisy_clip_candidates, o.noisy_clip_floor, o.noisy_clip_score == "code")
                else:
                    self._search_noise(index, name, layer, x, y)
        self._share(model)

    def _search_noise(self, index: int, name: str, layer: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> None:
        o = self.options
        step = input_step(layer)
        u = base_noise(layer.in_features, o.noisy_seed, index, o.noisy_noise).to(step.device) * step
        k = search_amplitude(layer, x, y, u, o.noisy_candidates, o.noisy_range)
        add_noise(layer, k * u)
        log.info("noisyquant %s: amplitude %.3g input steps", name, k)

    @staticmethod
    def _share(model: nn.Module) -> None:
        grids = [(layer, layer.input_quantizer.quantizer) for _, layer in noisy_layers(model)]
        capture.broadcast_from_rank0([t for layer, g in grids for t in (layer.bias, g.noise, g.scale, g.zero_point)])

    def after_reconstruct(self, model: nn.Module) -> None:
        """Reconstruction changed the weights: fold the denoising bias again with the new q(W)."""
        for _, layer in noisy_layers(model):
            if isinstance(layer.input_quantizer.quantizer, NoisyGrid):
                refold(layer)

    def before_load(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        for name, layer in model.named_modules():
            key = f"{name}.input_quantizer.quantizer.noise"
            if isinstance(layer, QuantLinear) and key in state and layer.input_quantizer.configured:
                point = layer.input_quantizer
                point.quantizer = NoisyGrid(point.quantizer, torch.zeros_like(state[key]), point.channel_axis)

    def describe_model(self, model: nn.Module) -> dict[str, Any]:
        amps = [float(layer.input_quantizer.quantizer.noise.abs().max() / layer.input_quantizer.quantizer.scale.max())
                for _, layer in noisy_layers(model) if isinstance(layer.input_quantizer.quantizer, NoisyGrid)]
        return {"noisy_layers": sum(a > 0 for a in amps), "noisy_max_steps": round(max(amps, default=0.0), 3)}


def noisy_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """Linear layers (not convolutions) whose input is quantized."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.input_quantizer.configured]


def base_noise(channels: int, seed: int, index: int, kind: str = "gaussian") -> torch.Tensor:
    """One value per input channel, the same for the same seed and layer position: the code's
    `randn * 2 - 1` (gaussian) or U(-1, 1) (uniform, the paper's)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if kind == "gaussian":
        return torch.randn(channels, generator=g) * 2 - 1
    return torch.rand(channels, generator=g) * 2 - 1


def tokens(t: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """A layer's recorded tokens as rows [T, C]: all of them, or a seeded sample of `count` (the same rows
    for the same count and seed, so inputs and outputs sampled apart stay paired)."""
    t = t.reshape(-1, t.shape[-1])
    if count is not None and t.shape[0] > count:
        keep = torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(seed))[:count].to(t.device)
        t = t[keep]
    return t


@torch.no_grad()
def quantized_weight_output(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """q(W) x + B on float tokens: the code's search target (its weights are quantized before the search)."""
    bias = 0.0 if layer.bias is None else layer.bias.detach()
    return x @ _qweight(layer).t() + bias


@torch.no_grad()
def float_output(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """W x + B on the tokens: the float layer (`noisy_target=float`)."""
    bias = 0.0 if layer.bias is None else layer.bias.detach()
    return x @ layer.weight.detach().t() + bias


@torch.no_grad()
def refit(point: QuantPoint, x: torch.Tensor) -> None:
    """Fit the point's grid to `x` alone with its own observer (MinMax: the code's absmax / qmax)."""
    point.observer.reset()
    point.observe(x)
    point.freeze()


def _qweight(layer: QuantLinear) -> torch.Tensor:
    with torch.no_grad():
        return layer.quantized_weight().detach()


@torch.no_grad()
def layer_output(layer: QuantLinear, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """q(W) q(X + N) + B - q(W) N on tokens x [..., C] (noise [..., C] broadcasts over tokens)."""
    grid = layer.input_quantizer.quantizer
    grid = grid.inner if isinstance(grid, NoisyGrid) else grid
    w = _qweight(layer)
    bias = torch.zeros(w.shape[0], device=w.device) if layer.bias is None else layer.bias.detach()
    if noise is None:
        return grid(x) @ w.t() + bias
    return grid(x + noise) @ w.t() + (bias - noise @ w.t())


def input_step(layer: QuantLinear) -> torch.Tensor:
    """The input grid's step per input channel (a per-tensor step repeated)."""
    scale = layer.input_quantizer.quantizer.scale.detach().reshape(-1)
    return scale.expand(layer.in_features) if scale.numel() == 1 else scale


@torch.no_grad()
def search_amplitude(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, count: int,
                     max_steps: float) -> float:
    """The multiple k in [0, max_steps] of the noise u (already in input steps) with the lowest output MSE
    on the tokens; ties go to the smaller amplitude, so k = 0 (the plain quantizer) wins when nothing helps."""
    ks = torch.linspace(0.0, max_steps, count)
    errors = []
    for chunk in ks.split(max(1, _CHUNK_ELEMENTS // (x.numel() + y.numel()))):
        noise = chunk.to(u.device).view(-1, 1, 1) * u  # [c, 1, C]
        errors.append((layer_output(layer, x.unsqueeze(0), noise) - y).pow(2).mean(dim=(1, 2)))
    return float(ks[int(torch.cat(errors).argmin())])


@torch.no_grad()
def search_clip(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor, count: int, floor: float = 0.001,
                clamp_first: bool = False) -> None:
    """Shrink the calibrated input step by the factor f in [floor, 1] (`count` values) with the lowest output
    MSE (no noise): the grid's range scales by f about its zero point, whatever its signedness. With
    `clamp_first` (the code's rule, symmetric grids), a candidate step s scores x clamped to +-qmax s."""
    q = layer.input_quantizer.quantizer
    scale, zp = q.scale.detach().clone(), q.zero_point.detach().clone()
    best = (float("inf"), scale, zp)
    for f in torch.linspace(floor, 1.0, count).flip(0):  # from the full range down: ties keep the wider clip
        q.set_params(scale * f, zp)
        bound = q.qmax * q.scale if clamp_first and q.symmetric else None
        scored = x if bound is None else torch.maximum(torch.minimum(x, bound), -bound)
        err = float((layer_output(layer, scored, None) - y).pow(2).mean())
        if err < best[0]:
            best = (err, q.scale.detach().clone(), q.zero_point.detach().clone())
    q.set_params(best[1], best[2])


@torch.no_grad()
def add_noise(layer: QuantLinear, noise: torch.Tensor) -> None:
    """Wrap the input grid with the noise and fold the denoising bias B - q(W) N into the layer."""
    w = _qweight(layer)
    point = layer.input_quantizer
    if isinstance(point.quantizer, NoisyGrid):
        point.quantizer = point.quantizer.inner
    point.quantizer = NoisyGrid(point.quantizer, noise, point.channel_axis)
    fold = noise.to(w.dtype) @ w.t()
    if layer.bias is None:
        layer.bias = nn.Parameter(-fold)
    else:
        layer.bias.sub_(fold)
    point.quantizer.folded = fold  # what the bias holds for q(W) N (kept in memory, for `refold`)


@torch.no_grad()
def refold(layer: QuantLinear) -> None:
    """Replace the folded q(W_old) N by q(W_new) N after the weights changed (block reconstruction)."""
    grid = layer.input_quantizer.quantizer
    fold = grid.noise.to(layer.weight.dtype) @ _qweight(layer).t()
    old = grid.__dict__.get("folded")
    if old is None:
        raise RuntimeError("the noise's folded bias is unknown in this process (a reloaded checkpoint): "
                           "reconstruct before saving, or calibrate again")
    layer.bias.add_(old - fold)
    grid.folded = fold
