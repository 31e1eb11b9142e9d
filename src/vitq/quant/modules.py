"""Quantizable twins of the float modules a vision transformer is made of.

Each twin is its float class plus quant points. `convert(module)` turns a float module into its twin in
place (the class is swapped, parameters and state-dict keys stay), so a rewritten model still loads the
float checkpoints it was made from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import integer_fqvit
from .integer import (exp_constants, int_layernorm, int_softmax_log2_codes, ln_constants, ln_std_bits,
                      LNConstants, LN_FRACTION_BITS)
from .points import Kind, QuantPoint


def _codes(q, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """q.to_codes(x) for a uniform grid, the same operations in place on one buffer."""
    scale, zp = q._shape(q.scale, x), q._shape(q.zero_point, x)
    return (x * (1.0 / scale)).round_().add_(zp).clamp_(q.qmin, q.qmax)


def _tensor_key(*tensors: torch.Tensor) -> tuple:
    """Identity and version of tensors: holding the tensors keeps their identities from being reused."""
    return tuple((t, t._version) for t in tensors)


def _same_key(a: tuple | None, b: tuple) -> bool:
    return a is not None and len(a) == len(b) and all(x is y and u == v for (x, u), (y, v) in zip(a, b))


def arithmetic_named(integer: bool | str) -> str | None:
    """An integer setting as the arithmetic it selects ("fqvit" or "exact"; True is "exact"'s former
    spelling), None for float."""
    return None if integer is False else "exact" if integer is True else str(integer)


def integer_arithmetic(module: nn.Module) -> str | None:
    """The integer arithmetic a LayerNorm or softmax runs, None where it runs in float."""
    return arithmetic_named(getattr(module, "integer", False))


class Twin:
    """Mixin of a quantizable twin: `convert` turns an instance of the float parent class into the twin in
    place (the class is swapped, parameters and state-dict keys stay), then adds the twin's points."""

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        module.__class__ = cls
        module._add_points()  # type: ignore[attr-defined]
        return module

    def _add_points(self) -> None:
        """Add the quant points and submodules the twin needs (none by default)."""


class QuantWeight(Twin):
    """Shared by QuantLinear and QuantConv2d: quantized input and weight, cached weight at inference."""

    weight: nn.Parameter
    act_channel_axis = -1  # channel of the input/output layout: tokens [B, T, C]

    def _add_points(self) -> None:
        self.input_quantizer = QuantPoint(Kind.LINEAR_INPUT, self.act_channel_axis)
        self.weight_quantizer = QuantPoint(Kind.WEIGHT, 0)
        self.output_quantizer: QuantPoint | None = QuantPoint(Kind.LINEAR_OUTPUT, self.act_channel_axis)
        self._wcache: tuple[tuple, torch.Tensor] | None = None

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def quantized_weight(self) -> torch.Tensor:
        """Under no_grad the fake-quantized weight is computed once and reused until the weight or the
        quantizer changes (tracked by tensor versions; writes through `.data` bypass them, so change
        weights with in-place ops under torch.no_grad())."""
        point = self.weight_quantizer
        if point.mode != "quant":
            return self.weight
        if torch.is_grad_enabled():
            return point(self.weight)
        q = point.quantizer
        key = (self.weight.data_ptr(), self.weight._version, q.scale.data_ptr(), q.scale._version,
               q.zero_point.data_ptr(), q.zero_point._version)
        if self._wcache is None or self._wcache[0] != key:
            self._wcache = (key, point(self.weight).detach())
        return self._wcache[1]

    def __getstate__(self) -> dict:  # deepcopy / pickle without the cache
        state = self.__dict__.copy()
        state["_wcache"] = None
        return state


class QuantLinear(QuantWeight, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias))


class QuantConv2d(QuantWeight, nn.Conv2d):
    act_channel_axis = 1  # feature maps [B, C, H, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias))


class QuantLayerNorm(Twin, nn.LayerNorm):
    """LayerNorm whose input (the residual stream) is a quant point.

    With `integer` set (FQ-ViT), the normalization runs on PTF codes in integer arithmetic and produces
    codes of `out_point`, the quantizer of the layer it feeds: "fqvit" is FQ-ViT's code
    (`integer_fqvit`), "exact" (or True) the int64 kernel of `integer.py`, False the float LayerNorm.
    """

    integer: bool | str = False
    # the adapter placed a plain per-tensor grid at the input (FQ-ViT's Swin: a LayerNorm after the patch
    # embedding or entering a stage reads a uniform QAct); the integer kernel reads it as PTF with every
    # factor 2^0, as the code's channel mask of ones
    uniform_input: bool = False

    def _add_points(self) -> None:
        self.input_quantizer = QuantPoint(Kind.NORM_INPUT)

    def input_grid(self) -> tuple[int, torch.Tensor, float]:
        """(zero point, per-channel power-of-two factors alpha, finest step) of the input grid."""
        q = self.input_quantizer.quantizer
        zp = int(q.zero_point.reshape(-1)[0])
        if getattr(q, "alpha", None) is not None:  # PTF
            return zp, q.alpha, float(q.base_scale)
        return zp, torch.zeros(self.normalized_shape[-1], device=q.scale.device), float(q.scale)

    def feeds(self, point: QuantPoint) -> None:
        object.__setattr__(self, "out_point", point)  # a reference, not a child module

    def can_run_integer(self) -> bool:
        out = getattr(self, "out_point", None)
        inp = self.input_quantizer
        grid = inp.spec is not None and (inp.spec.quantizer == "ptf" or (
            self.uniform_input and inp.spec.quantizer == "uniform" and not inp.spec.per_channel))
        return (inp.mode == "quant" and grid
                and out is not None and out.mode == "quant" and out.spec.quantizer == "uniform"
                and not out.spec.per_channel and self.weight is not None)

    def integer_problem(self, arithmetic: str = "exact") -> str | None:
        """Why the integer kernel cannot represent this calibrated LayerNorm (None: it can); FQ-ViT's
        floating-point statistics have no such limit."""
        if arithmetic == "fqvit":
            return None
        ptf, out = self.input_quantizer.quantizer, self.out_point.quantizer
        zp, alpha, _ = self.input_grid()
        x_max = int(max(ptf.qmax - zp, zp - ptf.qmin)) << int(alpha.max())
        g_max = int(torch.round(self.weight.detach().double().abs().max() / float(out.scale)
                                * (1 << LN_FRACTION_BITS)))
        try:
            ln_std_bits(self.normalized_shape[-1], x_max, g_max)
        except OverflowError as e:
            return str(e)
        return None

    def integer_constants(self) -> LNConstants:
        """Fixed-point constants of the integer kernel, computed once and reused until a parameter or a
        quantizer changes (tracked by tensor identity and version)."""
        ptf, out = self.input_quantizer.quantizer, self.out_point.quantizer
        zp, alpha, _ = self.input_grid()
        key = _tensor_key(self.weight, self.bias, getattr(ptf, "alpha", ptf.scale), ptf.scale, ptf.zero_point,
                          out.scale, out.zero_point)
        cache = self.__dict__.get("_int_cache")
        if cache is None or not _same_key(cache[0], key):
            consts = ln_constants(zp, alpha, self.weight, self.bias, float(out.scale),
                                  int(out.zero_point), out.qmin, out.qmax, ptf.qmin, ptf.qmax)
            cache = (key, consts)
            self.__dict__["_int_cache"] = cache
        return cache[1]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm of an input that is already quantized (a block quantizes its residual stream)."""
        if self.integer == "fqvit":
            ptf, out = self.input_quantizer.quantizer, self.out_point.quantizer
            zp, alpha, base = self.input_grid()
            codes = integer_fqvit.layernorm_codes(_codes(ptf, x), zp, alpha, base, self.weight, self.bias,
                                                  float(out.scale), int(out.zero_point), out.qmin, out.qmax)
            return out.from_codes(codes.to(x.dtype))
        if self.integer:
            ptf, out = self.input_quantizer.quantizer, self.out_point.quantizer
            k = self.integer_constants()
            codes = int_layernorm(_codes(ptf, x), k.zero_point, self.input_grid()[1], self.weight, self.bias,
                                  float(out.scale), k.out_zero_point, out.qmin, out.qmax, constants=k,
                                  dtype=x.dtype)
            return out.from_codes(codes)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.input_quantizer(x))


class QuantMatMul(nn.Module):
    """a @ b (or a @ b^T) with each operand a quant point (None: the operand is quantized upstream).

    With transpose_b, b is quantized before the transpose, so per-channel granularity on the last axis
    means per feature (head dimension) for both q and k.
    """

    def __init__(self, a_kind: str | None = Kind.MATMUL_INPUT, b_kind: str | None = Kind.MATMUL_INPUT,
                 transpose_b: bool = False) -> None:
        super().__init__()
        self.a_quantizer = QuantPoint(a_kind) if a_kind else None
        self.b_quantizer = QuantPoint(b_kind) if b_kind else None
        self.transpose_b = transpose_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return a @ (b.transpose(-2, -1) if self.transpose_b else b)


class QuantSoftmax(nn.Module):
    """Softmax whose input (attention scores) and output (probabilities) are quant points.

    `mask` (additive, e.g. Swin's shifted-window mask) is added after the input is quantized, so the
    score grid is not stretched by the mask's large negative values.
    """

    integer: bool | str = False  # as QuantLayerNorm's: "fqvit", "exact" (or True), False
    # FQ-ViT's calibration (`lis_in_calibration`): while the scores are observed, the calibration batch with
    # this index (-1: every batch) passes on the code's integer LIS probabilities instead of the float
    # softmax; None: never. `vitq.calibrate` sets the index from its batch count.
    calibration_lis: int | None = None

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.input_quantizer = QuantPoint(Kind.SOFTMAX_INPUT)
        self.output_quantizer = QuantPoint(Kind.SOFTMAX_OUTPUT)

    def can_run_integer(self) -> bool:
        inp, out = self.input_quantizer, self.output_quantizer
        return (self.dim in (-1,) and inp.mode == "quant" and inp.spec.quantizer == "uniform"
                and not inp.spec.per_channel and out.mode == "quant" and out.spec.quantizer == "log2")

    def integer_problem(self, arithmetic: str = "exact") -> str | None:
        """Why the integer softmax cannot represent this calibrated score grid (None: it can); FQ-ViT's
        floored constants take any step."""
        if arithmetic == "fqvit":
            return None
        try:
            exp_constants(float(self.input_quantizer.quantizer.scale))
        except ValueError as e:
            return (f"{e}: the score grid is too coarse for i-exp; use more activation bits (quant.a_bits) "
                    f"quant.integer=fqvit (FQ-ViT's floored constants) or quant.integer=false")
        return None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.integer:  # i-exp and log2 codes on the score grid (FQ-ViT's integer LIS)
            q_in, q_out = self.input_quantizer.quantizer, self.output_quantizer.quantizer
            kernel = integer_fqvit.softmax_codes if self.integer == "fqvit" else int_softmax_log2_codes
            codes = kernel(_codes(q_in, x), int(q_in.zero_point), float(q_in.scale), q_out.bits, mask)
            return self._log2_values(codes, x)
        x = self.input_quantizer(x)
        if self._lis_batch():
            return self._calibration_lis(x, mask)
        if mask is not None:
            x = x + mask
        return self.output_quantizer(x.softmax(dim=self.dim))

    def _lis_batch(self) -> bool:
        inp, out = self.input_quantizer, self.output_quantizer
        return (self.calibration_lis is not None and inp.mode == "observe" and out.configured
                and out.spec.quantizer == "log2" and inp.spec.quantizer == "uniform" and not inp.spec.per_channel
                and self.calibration_lis in (-1, inp.batches_seen - 1))

    @torch.no_grad()
    def _calibration_lis(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """FQ-ViT's `QIntSoftmax` in its last calibration batch: `qact_attn1` has just fitted its step on every
        batch (this one included) but passes the float scores, which `int_softmax` divides by that step
        unrounded; the log2 codes dequantize to what the downstream points observe."""
        grid = self.input_quantizer.quantizer.probe()
        self.input_quantizer.observer.fit(grid)
        zp, scale = float(grid.zero_point.reshape(-1)[0]), float(grid.scale.reshape(-1)[0])
        bits = self.output_quantizer.quantizer.bits
        codes = integer_fqvit.softmax_codes(x.double() / scale + zp, int(zp), scale, bits, mask)
        return self._log2_values(codes, x)

    def _log2_values(self, codes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Dequantize log2 codes by lookup: entry k is the output grid's value of code k, 0 .. qmax + 1."""
        out = self.output_quantizer.quantizer
        table = out.from_codes(torch.arange(out.qmax + 2, dtype=like.dtype, device=like.device))
        return table.index_select(0, codes.reshape(-1)).view(codes.shape)
