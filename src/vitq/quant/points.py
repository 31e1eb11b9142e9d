"""The quant point: one tensor's quantizer, its observer and its mode, as a named module.

Every place a recipe can quantize is a `QuantPoint` inside the model, so names come from the module
tree (`blocks.3.attn.qkv.input_quantizer` is the point `blocks.3.attn.qkv.input`) and a recipe only
has to say which spec stands at which kind of point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .observers import Observer, observer_for
from .quantizers import Grid, check_bits, get_grid


class Kind:
    """Kinds of quant point; recipes choose specs by kind, scopes enable sets of kinds."""

    WEIGHT = "weight"  # Linear / Conv2d weights
    LINEAR_INPUT = "linear_input"  # inputs of Linear / Conv2d layers
    MATMUL_INPUT = "matmul_input"  # operands of q.k^T and of attn.v (the value side)
    SOFTMAX_OUTPUT = "softmax_output"  # attention probabilities (the attn side of attn.v)
    NORM_INPUT = "norm_input"  # LayerNorm inputs: the residual sums, quantized in the stream itself
    LINEAR_OUTPUT = "linear_output"  # outputs of Linear / Conv2d (patch embedding, proj, fc1, fc2, head)
    SOFTMAX_INPUT = "softmax_input"  # attention scores before the softmax

    ALL = (WEIGHT, LINEAR_INPUT, MATMUL_INPUT, SOFTMAX_OUTPUT, NORM_INPUT, LINEAR_OUTPUT, SOFTMAX_INPUT)


MODES = ("off", "observe", "calibrate", "quant")
# how calibration data reaches the points: float (every point passes float values while observing) or
# quantized (each point passes its quantized values on, fitted to what it has seen so far: the codes that
# calibrate in one forward with quantization on); quantized_activations keeps the weights float meanwhile
CALIB_FLOWS = ("float", "quantized", "quantized_activations")

SCOPES: dict[str, frozenset[str]] = {
    # inputs and weights of every linear layer and both attention matmuls (PTQ4ViT, RepQ-ViT, I&S-ViT)
    "matmul": frozenset({Kind.WEIGHT, Kind.LINEAR_INPUT, Kind.MATMUL_INPUT, Kind.SOFTMAX_OUTPUT}),
    # inputs and weights of the linear (and convolution) layers only (NoisyQuant's "Linear" setting)
    "linear": frozenset({Kind.WEIGHT, Kind.LINEAR_INPUT}),
    # every tensor: also the residual sums / LayerNorm inputs, layer outputs and attention scores (FQ-ViT)
    "full": frozenset(Kind.ALL),
}


@dataclass
class PointSpec:
    """What stands at one quant point."""

    bits: int = 8
    symmetric: bool = False
    signed: bool | None = None
    per_channel: bool = False
    axis: int | None = None  # per-channel axis; default: the point's layout channel (set by the adapter)
    observer: str = "minmax"
    observer_args: dict = field(default_factory=dict)
    learnable: bool = False
    enable: bool = True
    quantizer: str = "uniform"  # a registered grid: uniform | ptf | log2 | log_sqrt2 | adalog (see GRIDS)
    max_factor: int = 3  # PTF: channel factors 2^0 .. 2^K
    # the range always holds 0 (widened if need be, zero point within the codes), or, false, the calibrated
    # [min, max] as it is, the zero point wherever it falls (RepQ-ViT's and I&S-ViT's quantizers)
    zero_in_range: bool = True
    # signed symmetric grids: step max|x| / ((2^b - 1) / 2) (FQ-ViT's observers; code -2^(b-1) never used)
    # instead of max|x| / (2^(b-1) - 1)
    half_span: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits, "quant point")
        for name in ("symmetric", "per_channel", "learnable", "enable", "signed", "zero_in_range", "half_span"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "signed" and value is None):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        for name in ("axis", "max_factor"):
            value = getattr(self, name)
            if (not isinstance(value, int) or isinstance(value, bool)) and not (name == "axis" and value is None):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        grid = get_grid(self.quantizer)
        if grid.observed:  # build the observer once now, so a bad name or argument fails early
            try:
                axis = (-1 if self.axis is None else self.axis) if self.per_channel else None
                observer_for(grid.from_spec(self, axis, -1), self, axis, -1)
            except TypeError as e:
                raise ValueError(f"observer {self.observer!r} does not take these arguments: {e}") from None

    @property
    def granularity(self) -> str:
        return "per_channel" if self.per_channel else "per_tensor"


class CalibrationError(RuntimeError):
    """Calibration saw data from which no meaningful quantization grid can be made."""


class QuantPoint(nn.Module):
    """One tensor's fake quantizer with an attached observer.

    Modes: `off` (pass-through), `observe` (pass the float value, update the observer) and `quant`.
    `channel_axis` is the true channel of the tensor's layout, set by the twin that owns the point:
    -1 for tokens [B, T, C] and attention operands [B, heads, T, d], 1 for convolution maps [B, C, H, W],
    0 for weights (output channels).
    """

    def __init__(self, kind: str, channel_axis: int | None = None) -> None:
        super().__init__()
        if kind not in Kind.ALL:
            raise ValueError(f"unknown quant point kind {kind!r}; known kinds: {Kind.ALL}")
        self.kind = kind
        self.channel_axis = (0 if kind == Kind.WEIGHT else -1) if channel_axis is None else channel_axis
        self.spec: PointSpec | None = None
        self.quantizer: Grid | None = None
        self.observer: Observer | None = None
        self.mode = "off"
        self.path = ""  # the point's name in its model (set when a recipe is placed): for messages
        self.batches_seen = 0  # observed batches since observing began: names the batch in errors

    def extra_repr(self) -> str:
        return f"kind={self.kind}, channel_axis={self.channel_axis}, mode={self.mode}"

    @property
    def configured(self) -> bool:
        return self.quantizer is not None

    def configure(self, spec: PointSpec | None) -> None:
        """Place a quantizer and observer as the spec says (None or enable=False: leave it float)."""
        self.mode = "off"
        if spec is None or not spec.enable:
            self.spec, self.quantizer, self.observer = spec, None, None
            return
        axis = (self.channel_axis if spec.axis is None else spec.axis) if spec.per_channel else None
        self.spec = spec
        self.quantizer = get_grid(spec.quantizer).from_spec(spec, axis, self.channel_axis)
        self.observer = observer_for(self.quantizer, spec, axis, self.channel_axis)

    def set_mode(self, mode: str) -> None:
        """off: pass float values; observe: pass float values and feed the observer; calibrate: feed the
        observer, fit the grid to everything observed so far and pass the quantized values (calibration
        with quantized upstream points); quant: quantize."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode if self.configured else "off"
        if self.mode in ("observe", "calibrate"):
            self.batches_seen = 0

    @torch.no_grad()
    def freeze(self) -> None:
        """Turn the observer's statistics into the quantizer's scale and zero point."""
        if not self.configured or self.observer is None:
            return
        if self.observer.empty:
            raise RuntimeError(
                "this quant point saw no data during calibration; check that the calibration loop "
                "runs the model forward, or disable the point with a recipe override"
            )
        self.observer.fit(self.quantizer)
        bad = [n for n, t in self.quantizer.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise CalibrationError(f"quant point {self.path or self.kind}: calibration gave non-finite {', '.join(bad)}; "
                                   "the observed statistics overflow (check the calibration data and the float model)")

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Feed one batch (or a weight) to the observer, refusing what would make a meaningless grid."""
        axis = self.observer.axis
        if axis is not None and not -x.dim() <= axis < x.dim():
            raise ValueError(f"quant point {self.path or self.kind}: axis={axis} is out of range for its "
                             f"{x.dim()}-d tensor {list(x.shape)}; use an axis in [{-x.dim()}, {x.dim() - 1}] "
                             f"(or leave axis unset for the layout's channel, {self.channel_axis})")
        if not bool(torch.isfinite(x).all()):
            what = "its weight" if self.kind == Kind.WEIGHT else f"calibration batch {self.batches_seen} (from 0)"
            raise CalibrationError(
                f"quant point {self.path or self.kind}: {what} holds NaN or Inf values, which would give it a "
                "non-finite scale. Check the calibration data (a corrupt image, a wrong normalization) or the "
                "float model (a point after the first one sees values the model itself produced)")
        self.observer.observe(x)
        self.batches_seen += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            return self.quantizer(x)
        if self.mode in ("observe", "calibrate") and self.observer is not None and x.numel() > 0:  # empty: nothing
            self.observe(x)
            if self.mode == "calibrate":
                self.freeze()
        return self.quantizer(x) if self.mode == "calibrate" else x


class QuantAct(QuantPoint):
    """A quant point inserted on its own in the graph (e.g. on a residual sum)."""
