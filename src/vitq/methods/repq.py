"""RepQ-ViT (Li et al., ICCV 2023): per-channel calibration of post-LayerNorm activations, then
reparameterization to per-tensor scales; log-sqrt2 attention probabilities; quantile-searched clips.

For each LayerNorm -> Linear pair the adapter names (qkv and fc1 inputs, Swin's reduction input), the
Linear's input is calibrated per channel (scale s_c, zero point z_c). With s~ = mean(s), z~ = mean(z)
and r = s / s~, the LayerNorm's affine becomes gamma / r, beta / r + s~ (z - z~) and the Linear's weight
W r (per input column), bias b - W (s (z - z~)). The input quantizer then uses (s~, z~) per tensor; the
changed weights are calibrated again. The code leaves z~ unrounded (`fold_zero_point: mean`), which moves
each channel's clamp range by a fraction of a step; rounded (`rounded`), the shift is an integer number of
steps and the per-tensor codes are exactly the per-channel ones.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..models import NormPair, norm_pairs
from ..quant.ops import refit_weight
from ..quant.recipe import Override
from . import capture
from .base import Method, register_method


@dataclasses.dataclass
class RepQOptions:
    reparameterize: bool = True  # false: keep the per-channel post-LayerNorm quantizers (for ablation)
    fold_zero_point: str = "mean"  # the folded zero point: mean (unrounded, the code) | rounded (an exact fold)

    def __post_init__(self) -> None:  # a bad value fails when the recipe is read, before any model is built
        check_fold_zero_point(self.fold_zero_point)


def check_fold_zero_point(value: str) -> None:
    if value not in ("mean", "rounded"):
        raise ValueError(f"quant.fold_zero_point={value!r}: choose mean (the code's) or rounded (an exact fold)")


@register_method
class RepQ(Method):
    name = "repq"
    Options = RepQOptions

    def prepare(self, model: nn.Module) -> None:
        per_channel_post_norm_inputs(model)

    def after_freeze(self, model: nn.Module) -> None:
        if self.options.reparameterize:
            fold_post_norm_inputs(model, self.options.fold_zero_point == "rounded")


def per_channel_post_norm_inputs(model: nn.Module) -> None:
    """Make the uniform input grid of every LayerNorm-fed layer per channel (recorded in the recipe)."""
    for pair in norm_pairs(model):
        point = pair.consumer.input_quantizer
        if point.configured and point.spec.quantizer == "uniform" and not point.spec.per_channel:
            set_granularity(model, f"{pair.consumer_name}.input", point, per_channel=True)


def fold_post_norm_inputs(model: nn.Module, round_zero_point: bool = True) -> int:
    """Fold every calibrated per-channel post-LayerNorm input grid into its LayerNorm and consumer (with a
    rounded zero point the codes do not change); returns how many pairs were folded."""
    done = 0
    for pair in norm_pairs(model):
        point = pair.consumer.input_quantizer
        if point.configured and point.spec.per_channel and point.quantizer.scale.numel() > 1:
            reparameterize(model, pair, round_zero_point)
            done += 1
    return done


def set_granularity(model: nn.Module, name: str, point: nn.Module, per_channel: bool) -> None:
    """Record the change in the model's recipe (so a saved checkpoint reloads the same layout) and apply
    it to the point, keeping the point's parameters when only the record changes."""
    model.vitq.recipe.overrides.append(Override(name, None, {"per_channel": per_channel}))
    if point.spec.per_channel != per_channel:
        point.configure(model.vitq.recipe.resolve(name, point.kind))


@torch.no_grad()
def reparameterize(model: nn.Module, pair: NormPair, round_zero_point: bool = True) -> None:
    """Fold the per-channel scale and zero point of the consumer's input into the LayerNorm and the
    consumer, and make the input quantizer per tensor. In exact arithmetic the codes and the layer's
    output do not change."""
    norm, linear = pair.norm, pair.consumer
    if norm.weight is None or norm.bias is None:
        raise ValueError("RepQ-ViT reparameterization needs a LayerNorm with an affine (weight and bias)")
    point = linear.input_quantizer
    q = point.quantizer
    s, z = q.scale.detach().clone(), q.zero_point.detach().clone()
    # a fractional zero point needs the grid that takes one (zero_in_range: false); others round it
    z_t = torch.round(z.mean()) if round_zero_point or q.zero_in_range else z.mean()
    s_t = s.mean()
    r = s / s_t
    norm.weight.div_(r)
    norm.bias.div_(r).add_(s_t * (z - z_t))
    shift = linear.weight @ (s * (z - z_t))  # from the weight before it is scaled
    linear.weight.mul_(r)
    if linear.bias is None:
        linear.bias = nn.Parameter(-shift)
    else:
        linear.bias.sub_(shift)
    capture.remap_inputs(linear, lambda x: x / r + s_t * (z - z_t))  # cached inputs, for later searches
    set_granularity(model, f"{pair.consumer_name}.input", point, per_channel=False)
    point.quantizer.set_params(s_t.reshape(1), z_t.reshape(1))
    point.set_mode("quant")
    refit_weight(linear)
