"""FQ-ViT (Lin et al., IJCAI 2022): Power-of-Two Factor at LayerNorm inputs, Log-Int-Softmax, and the
integer-only LayerNorm / softmax kernels.

Switches (`quant.<name>`): `ptf` puts the PTF grid at every `norm_input` point, `lis` the log2 grid at
every `softmax_output` point, `integer` runs those LayerNorms and softmaxes through integer arithmetic
once calibrated: `fqvit` (the default) is the code's (`QIntLayerNorm` mode 'int' wherever PTF is on,
`int_softmax` wherever LIS is), `exact` vitq's int64 kernels (checked right then: a grid they cannot
represent fails with the fix), `false` the float LayerNorm and softmax on quantized inputs.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..quant.modules import QuantLayerNorm, QuantSoftmax, arithmetic_named
from ..quant.ops import INTEGER_ARITHMETIC, set_integer
from ..quant.points import Kind, PointSpec
from ..quant.sample_observers import PTF_SAMPLES
from .base import Method, register_method


@dataclasses.dataclass
class FQViTOptions:
    ptf: bool = True  # Power-of-Two Factor quantizer at LayerNorm inputs (scope full)
    lis: bool = True  # log2 attention probabilities, attn_bits wide (Log-Int-Softmax)
    # LayerNorm and softmax arithmetic once calibrated: fqvit (the code's) | exact (int64; needs ptf and lis,
    # true is its former spelling) | false (float on quantized inputs)
    integer: bool | str = "fqvit"
    # PTF's layer-wise range: running min/max whatever the calibrator, as the code's PtfObserver (config.py
    # sets OBSERVER_A_LN = 'ptf' when ptf is on); calibrator: the range of quant.observer
    ptf_range: str = "minmax"
    # the tokens PTF's factor search scores: last_batch, every token of the last calibration batch (the code's
    # PtfObserver on its last_calibrate batch) | tokens, a 4096-token sample spanning the calibration set
    ptf_sample: str = "last_batch"
    # the code's last calibration batch runs the integer LIS softmax (its qact_attn1 step is set by then), so
    # the points after the attention probabilities calibrate on them; false: on the float softmax
    lis_in_calibration: bool = True


@register_method
class FQViT(Method):
    name = "fqvit"
    grid_switches = {"log2": "quant.lis=false"}
    Options = FQViTOptions

    def specs(self, specs: dict[str, PointSpec], scope: str) -> dict[str, PointSpec]:
        o = self.options
        if o.integer is not False and self.arithmetic() not in INTEGER_ARITHMETIC:
            raise ValueError(f"quant.integer={o.integer!r}: choose fqvit (FQ-ViT's code), exact (vitq's int64 "
                             "kernels) or false (float LayerNorm and softmax)")
        if self.arithmetic() == "exact" and not (scope == "full" and o.ptf and o.lis):
            raise ValueError("quant.integer=exact needs the integer-ready FQ-ViT setting: quant.scope=full, "
                             "quant.ptf=true and quant.lis=true (e.g. quant=fqvit quant.integer=exact)")
        specs = dict(specs)
        if o.ptf_range not in ("minmax", "calibrator"):
            raise ValueError(f"quant.ptf_range={o.ptf_range!r}: choose minmax (FQ-ViT's code) or calibrator")
        if o.ptf_sample not in PTF_SAMPLES:
            raise ValueError(f"quant.ptf_sample={o.ptf_sample!r}: choose last_batch (FQ-ViT's code) or tokens")
        if o.ptf and Kind.NORM_INPUT in specs:
            ptf = dataclasses.replace(specs[Kind.NORM_INPUT], quantizer="ptf")
            if o.ptf_range == "minmax" and ptf.observer != "minmax":
                ptf = dataclasses.replace(ptf, observer="minmax", observer_args={})
            specs[Kind.NORM_INPUT] = dataclasses.replace(ptf, observer_args={**ptf.observer_args,
                                                                             "sample": o.ptf_sample})
        if o.lis and Kind.SOFTMAX_OUTPUT in specs:
            specs[Kind.SOFTMAX_OUTPUT] = dataclasses.replace(specs[Kind.SOFTMAX_OUTPUT], quantizer="log2")
        return specs

    def calibrates_in_order(self) -> bool:
        return self.options.lis and self.options.lis_in_calibration

    def prepare(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, QuantSoftmax):
                m.calibration_lis = -1 if self.calibrates_in_order() else None

    def arithmetic(self) -> str | None:
        """The integer arithmetic the options ask for (None: float LayerNorm and softmax)."""
        return arithmetic_named(self.options.integer)

    def after_freeze(self, model: nn.Module) -> None:
        arithmetic = self.arithmetic()
        if arithmetic is not None:  # checks every kernel's grid now, not at the first evaluation batch
            set_integer(model, arithmetic=arithmetic, strict=arithmetic == "exact")
            if not self.options.ptf:  # the code's INT_NORM is its ptf switch: no LayerNorm runs integer then,
                for m in model.modules():  # also where a plain input grid would allow it (Swin's stage inputs)
                    if isinstance(m, QuantLayerNorm):
                        m.integer = False
