"""A calibrated vitq model as an ONNX file of standard operators with QuantizeLinear / DequantizeLinear pairs.

Every quantized point on a uniform grid (uniform, PTF, a NoisyQuant-wrapped uniform grid) becomes a Q/DQ pair
with the point's own scale and zero point; weights are stored as 8-bit codes behind a DequantizeLinear, laid
out so that the DequantizeLinear feeds the MatMul / Conv directly (the pattern onnxruntime fuses into integer
kernels). Non-uniform grids (log2, log-sqrt2, SULQ) have no ONNX operator: the export stops and names them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..files import written_atomically
from ..quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantWeight, integer_arithmetic
from ..quant.ops import iter_points
from ..quant.points import Kind, QuantPoint
from ..quant.state import is_calibrated
from .qdq import STORAGE, Dequant, QDQParams, QuantDequant

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
DEFAULT_OPSET = 17  # LayerNormalization as one operator
UNIFORM_GRIDS = ("uniform", "ptf")


class ExportError(ValueError):
    """The model cannot be written as Q/DQ ONNX as it is; the message names the points and the fix."""


@dataclass
class ExportReport:
    path: Path
    bytes: int
    opset: int
    qdq_points: list[str] = field(default_factory=list)  # activations written as Q/DQ pairs
    int8_weights: list[str] = field(default_factory=list)  # layers whose weights are stored as codes
    float_points: list[str] = field(default_factory=list)  # points the recipe leaves float


def qdq_params(point: QuantPoint, rank: int | None = None) -> QDQParams:
    """The point's calibrated uniform grid in ONNX's terms (zero point in the storage type)."""
    p = point.quantizer.export_params()
    signed = p["qmin"] < 0
    dtype = STORAGE[signed][0]
    scale, zero_point = p["scale"].detach().float().cpu().clone(), p["zero_point"].detach().float().cpu().clone()
    axis = p.get("axis")
    if axis is None or scale.numel() == 1:
        axis, scale, zero_point = None, scale.reshape(()), zero_point.reshape(())
    elif rank is not None:
        axis %= rank
    noise = p.get("noise")
    return QDQParams(scale, zero_point.round().to(dtype), p["qmin"], p["qmax"], axis,
                     None if noise is None else noise.detach().float().cpu(), p.get("noise_axis", -1))


def check_opset(opset: int) -> None:
    """The opsets this export writes: per-axis Q/DQ from 13, up to what torch's TorchScript exporter knows."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as newest

    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        old = "too old: per-channel QuantizeLinear / DequantizeLinear need opset >= 13" if isinstance(opset, int) \
            and opset < MIN_OPSET else f"not one torch's exporter writes (13 to {newest})"
        raise ExportError(f"opset {opset} is {old}; use opset={DEFAULT_OPSET} (the default)")


def export_problems(model: nn.Module, before_calibration: bool = False) -> list[str]:
    """Why this model cannot be exported as Q/DQ ONNX, one line per cause with the override that fixes it.
    `before_calibration`: the checks a quantized, not yet calibrated model already answers (its grids, bits
    and granularity), for a run to fail at start-up rather than after calibrating."""
    configured = any(p.configured for _, p in iter_points(model))  # none: a float model (quant=fp32), exported as is
    if configured and not before_calibration and getattr(model, "vitq", None) is not None and not is_calibrated(model):
        return ["the model was quantized but never calibrated: call vitq.calibrate(model, loop) (or load a "
                "quantized.ckpt) before exporting"]
    problems: list[str] = []
    nonuniform: dict[str, dict[str, str]] = {}  # kind -> {"<point> (<grid>)": grid}
    wide, outside = [], []
    for name, point in iter_points(model):
        if point.mode != "quant":
            continue
        params = point.quantizer.export_params()
        if params["grid"] not in UNIFORM_GRIDS:
            nonuniform.setdefault(point.kind, {})[f"{name} ({params['grid']})"] = params["grid"]
            continue
        _, lo, hi = STORAGE[params["qmin"] < 0]
        if params["qmax"] - params["qmin"] > hi - lo:
            wide.append(f"{name} ({point.quantizer.bits} bits)")
        zp = params["zero_point"]
        if not before_calibration and bool((zp < lo).any() or (zp > hi).any()):
            outside.append(name)
    state = getattr(model, "vitq", None)
    switches = getattr(state.recipe.method_impl(), "grid_switches", {}) if state is not None else {}
    for kind, found in nonuniform.items():
        placed = sorted({switches[g] for g in found.values() if g in switches})  # a method's own grid: its switch
        fix = " or ".join(placed) if placed else f"quant.{kind}.quantizer=uniform"
        problems.append(f"non-uniform grid at {_listed(list(found))}: ONNX has no operator for it; make it uniform "
                        f"with {fix}, or leave the points float with quant.{kind}.enable=false")
    if wide:
        problems.append(f"more than 8 bits at {_listed(wide)}: the export stores codes in 8 bits; use bits <= 8 for "
                        "these points (quant.w_bits / quant.a_bits or a recipe override)")
    if outside:
        problems.append(f"zero point outside the 8-bit codes at {_listed(outside)} (a calibrated range that does not "
                        "hold 0): quantize with zero_in_range: true for these points")
    reduced = _reduction_axis_points(model)
    if reduced:
        problems.append(f"per-channel grid along the summed axis of a matmul at {_listed(reduced)}: an integer matmul "
                        "takes one scale per row of A and per column of B, so these cannot run as int8; make them "
                        "per tensor (per_channel: false for these points)")
    integer = [n for n, m in model.named_modules() if integer_arithmetic(m) is not None]
    if integer:
        problems.append(f"integer LayerNorm / softmax kernels at {_listed(integer)}: they are simulated, not "
                        "exported; switch them off (quant.integer=false, or vitq.set_integer(model, False))")
    owners = {id(m.weight_quantizer) for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    stray = [n for n, p in iter_points(model) if p.kind == Kind.WEIGHT and p.mode == "quant" and id(p) not in owners]
    if stray:
        problems.append(f"quantized weights of layers the exporter does not know at {_listed(stray)}")
    return problems


def _reduction_axis_points(model: nn.Module) -> list[str]:
    """Quantized operands of a matmul, linear or convolution layer with per-channel grids along an axis the
    product sums over."""
    found = []
    for module in model.modules():
        if isinstance(module, QuantLinear):  # tokens [B, T, C] and weights [out, in] sum over C / in
            operands = [(module.input_quantizer, {-1, 2}), (module.weight_quantizer, {1, -1})]
        elif isinstance(module, QuantConv2d):  # maps [B, C, H, W] and weights [out, in, kh, kw]
            operands = [(module.input_quantizer, {1, -3}), (module.weight_quantizer, {1, 2, 3, -1, -2, -3})]
        elif isinstance(module, QuantMatMul):  # attention operands [B, heads, T, d]
            operands = [(module.a_quantizer, {-1, 3}), (module.b_quantizer, {-1, 3} if module.transpose_b else {-2, 2})]
        else:
            continue
        for point, summed in operands:
            q = None if point is None or point.mode != "quant" else point.quantizer
            if getattr(q, "per_channel", False) and q.axis in summed:
                found.append(point.path)
    return found


def _listed(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _point_forward(point: QuantPoint, params: QDQParams | None, x: torch.Tensor) -> torch.Tensor:
    if params is None:
        return x
    if params.axis is not None:
        params = replace(params, axis=params.axis % x.dim())
    return QuantDequant.apply(x, params)


def _weight(module: QuantWeight, transpose: bool) -> tuple[torch.Tensor, QDQParams] | torch.Tensor:
    """The layer's weight for the graph: codes and their grid when quantized (as W^T for a MatMul, so no
    Transpose stands between the DequantizeLinear and the MatMul), else the float weight."""
    point = module.weight_quantizer
    w = module.weight.detach()
    if point.mode != "quant":
        return w.t().contiguous() if transpose else w.clone()
    p = qdq_params(point, w.dim())
    codes = point.quantizer.to_codes(w).to(p.zero_point.dtype)
    if transpose:
        codes, p = codes.t().contiguous(), replace(p, axis=None if p.axis is None else 1 - p.axis)
    return codes, p


def _weight_value(weight: tuple[torch.Tensor, QDQParams] | torch.Tensor) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else Dequant.apply(*weight)


def _linear_forward(module: QuantLinear, weight, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    y = module.input_quantizer(x) @ _weight_value(weight)
    return module._output(y if module.bias is None else y + module.bias)


def _conv_forward(module: QuantConv2d, weight, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return module._output(module._conv_forward(module.input_quantizer(x), _weight_value(weight), module.bias))


def _matmul_forward(module: QuantMatMul, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """As QuantMatMul, with b transposed before its quantizer where the grid is per tensor (the same values),
    so the DequantizeLinear feeds the MatMul."""
    if module.a_quantizer is not None:
        a = module.a_quantizer(a)
    bq = module.b_quantizer
    if module.transpose_b and (bq is None or bq.mode != "quant" or not bq.quantizer.per_channel):
        b = b.transpose(-2, -1)
        return a @ (b if bq is None else bq(b))
    b = b if bq is None else bq(b)
    return a @ (b.transpose(-2, -1) if module.transpose_b else b)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Evaluation mode while the block runs; every submodule's own training flag back after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.train(flag)


@contextlib.contextmanager
def export_forwards(model: nn.Module) -> Iterator[None]:
    """Swap the forward of every quant point, quantized layer and attention matmul for its Q/DQ form while
    the block runs (restored after, also on error)."""
    swapped = []  # grids and weight codes are computed here, before tracing, so they enter as constants
    try:
        for module in model.modules():
            forward: Any = None
            if isinstance(module, QuantPoint):
                forward = partial(_point_forward, module, qdq_params(module) if module.mode == "quant" else None)
            elif isinstance(module, QuantLinear):
                forward = partial(_linear_forward, module, _weight(module, transpose=True))
            elif isinstance(module, QuantConv2d):
                forward = partial(_conv_forward, module, _weight(module, transpose=False))
            elif isinstance(module, QuantMatMul):
                forward = partial(_matmul_forward, module)
            if forward is not None:
                module.forward = forward
                swapped.append(module)
        yield
    finally:
        for module in swapped:
            del module.forward


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True) -> ExportReport:
    """Write `model` (a calibrated vitq model, or a float model as it is) to `path` as ONNX.

    `example_input` is one batch of model inputs (its values do not matter, its shape does); with
    `dynamic_batch` the file takes any batch size. Nothing is written when the model cannot be exported.
    """
    check_opset(opset)
    problems = export_problems(model)
    if problems:
        raise ExportError("cannot export this model as Q/DQ ONNX:\n  " + "\n  ".join(problems))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).cpu()  # the grids and codes are CPU constants: trace on the CPU
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    buffer = io.BytesIO()
    with evaluating(model), export_forwards(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant notices
        torch.onnx.export(model, (example_input.cpu(),), buffer, input_names=["input"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    with written_atomically(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    points = list(iter_points(model))
    return ExportReport(
        path, path.stat().st_size, opset,
        qdq_points=[n for n, p in points if p.mode == "quant" and p.kind != Kind.WEIGHT],
        int8_weights=[n for n, p in points if p.mode == "quant" and p.kind == Kind.WEIGHT],
        float_points=[n for n, p in points if p.mode != "quant"])
