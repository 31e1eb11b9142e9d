"""FQ-ViT (Lin et al., IJCAI 2022): Power-of-Two Factor at LayerNorm inputs, Log-Int-Softmax, and the
integer-only LayerNorm / softmax kernels.

Switches (`quant.<name>`): `ptf` puts the PTF grid at every `norm_input` point, `lis` the log2 grid at
every `softmax_output` point, `integer` runs those LayerNorms and softmaxes through the integer kernels
once calibrated (checked right then: a grid the kernels cannot represent fails with the fix).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..quant.ops import set_integer
from ..quant.points import Kind, PointSpec
from .base import Method, register_method


@dataclasses.dataclass
class FQViTOptions:
    ptf: bool = True  # Power-of-Two Factor quantizer at LayerNorm inputs (scope full)
    lis: bool = True  # log2 attention probabilities, attn_bits wide (Log-Int-Softmax)
    integer: bool = False  # LayerNorm and softmax through the integer kernels (needs ptf and lis)
    # PTF's layer-wise range: running min/max whatever the calibrator, as the code's PtfObserver (config.py
    # sets OBSERVER_A_LN = 'ptf' when ptf is on); calibrator: the range of quant.observer
    ptf_range: str = "minmax"


@register_method
class FQViT(Method):
    name = "fqvit"
    Options = FQViTOptions

    def specs(self, specs: dict[str, PointSpec], scope: str) -> dict[str, PointSpec]:
        o = self.options
        if o.integer and not (scope == "full" and o.ptf and o.lis):
            raise ValueError("quant.integer=true needs the integer-ready FQ-ViT setting: quant.scope=full, "
                             "quant.ptf=true and quant.lis=true (e.g. quant=fqvit quant.integer=true)")
        specs = dict(specs)
        if o.ptf_range not in ("minmax", "calibrator"):
            raise ValueError(f"quant.ptf_range={o.ptf_range!r}: choose minmax (FQ-ViT's code) or calibrator")
        if o.ptf and Kind.NORM_INPUT in specs:
            ptf = dataclasses.replace(specs[Kind.NORM_INPUT], quantizer="ptf")
            if o.ptf_range == "minmax" and ptf.observer != "minmax":
                ptf = dataclasses.replace(ptf, observer="minmax", observer_args={})
            specs[Kind.NORM_INPUT] = ptf
        if o.lis and Kind.SOFTMAX_OUTPUT in specs:
            specs[Kind.SOFTMAX_OUTPUT] = dataclasses.replace(specs[Kind.SOFTMAX_OUTPUT], quantizer="log2")
        return specs

    def after_freeze(self, model: nn.Module) -> None:
        if self.options.integer:
            set_integer(model)  # checks every kernel's grid now, not at the first evaluation batch
