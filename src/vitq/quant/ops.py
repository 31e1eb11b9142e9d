"""Operations on the quant points of a model that is already quantized: list, switch, refit, summarize.

Pure PyTorch on the points `vitq.quant` defines; binding a recipe to a model (`quantize`, `calibrate`)
is `vitq.pipeline`'s job.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from .modules import QuantLayerNorm, QuantSoftmax
from .points import QuantPoint
from .state import quant_state

INTEGER_ARITHMETIC = ("fqvit", "exact")  # FQ-ViT's code (integer_fqvit.py) | vitq's int64 kernels (integer.py)


def point_name(module_path: str) -> str:
    """`blocks.0.attn.qkv.input_quantizer` -> `blocks.0.attn.qkv.input`."""
    return module_path[: -len("_quantizer")] if module_path.endswith("_quantizer") else module_path


def iter_points(model: nn.Module) -> Iterator[tuple[str, QuantPoint]]:
    for path, module in model.named_modules():
        if isinstance(module, QuantPoint):
            yield point_name(path), module


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every configured point to `off` (float), `observe` or `quant`."""
    for _, point in iter_points(model):
        point.set_mode(mode)


@torch.no_grad()
def refit_weight(module: nn.Module) -> None:
    """Calibrate a layer's weight quantizer again after its weight changed (e.g. a reparameterization)."""
    point = module.weight_quantizer
    if point.configured and point.observer is not None:
        point.observer.reset()
        point.observe(module.weight)
        point.freeze()


def set_integer(model: nn.Module, enabled: bool = True, arithmetic: str = "fqvit", strict: bool = True) -> int:
    """Run LayerNorms and softmaxes through the integer kernels; returns how many modules switched.

    `arithmetic` is "fqvit" (FQ-ViT's code: floating-point LayerNorm statistics with an 8-bit dyadic
    multiplier, i-exp with floored constants; `integer_fqvit.py`) or "exact" (vitq's int64 kernels,
    `integer.py`). A LayerNorm switches where its input is PTF (or a per-tensor uniform grid its adapter
    placed for it: `QuantLayerNorm.uniform_input`) and it feeds a per-tensor uniform quantizer, a softmax where its scores are uniform per tensor and its probabilities log2 (FQ-ViT's code
    does the same per module: `INT_NORM` with PTF, `INT_SOFTMAX` with LIS). Every kernel's calibrated grid
    is checked first: one the arithmetic cannot represent fails here, named, instead of at the first
    evaluation batch. With `strict`, a model where nothing can switch is an error.
    """
    if arithmetic not in INTEGER_ARITHMETIC:
        raise ValueError(f"integer arithmetic {arithmetic!r} is unknown: choose one of {INTEGER_ARITHMETIC}")
    ready = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (QuantLayerNorm, QuantSoftmax)) and m.can_run_integer()]
    if enabled:
        if not ready and strict:
            raise ValueError("no LayerNorm or softmax can run integer-only: that needs a calibrated model with "
                             "PTF LayerNorm inputs or log2 attention probabilities (quant=fqvit, ptf or lis on)")
        problems = [f"{n}: {msg}" for n, m in ready if (msg := m.integer_problem(arithmetic)) is not None]
        if problems:
            raise ValueError("the integer kernels cannot run this calibrated model:\n  " + "\n  ".join(problems[:5])
                             + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""))
    for module in model.modules():
        if isinstance(module, (QuantLayerNorm, QuantSoftmax)):
            module.integer = False
    for _, module in ready:
        module.integer = arithmetic if enabled else False
    return len(ready) if enabled else 0


def summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quant point: name, kind, mode, bits, granularity, observer and scale range."""
    rows = []
    for name, p in iter_points(model):
        row: dict[str, Any] = {"name": name, "kind": p.kind, "mode": p.mode}
        if p.configured:
            q, s = p.quantizer, p.spec
            scale = getattr(q, "scale", None)
            row.update(bits=q.bits, granularity=s.granularity if s.quantizer == "uniform" else s.quantizer,
                       channel_axis=p.channel_axis,
                       symmetric=s.symmetric, signed=s.signed, observer=s.observer if p.observer else None,
                       scale_min=None if scale is None else float(scale.min()),
                       scale_max=None if scale is None else float(scale.max()))
        else:
            row.update(bits=None, granularity="float", channel_axis=p.channel_axis, symmetric=None, signed=None,
                       observer=None,
                       scale_min=None, scale_max=None)
        rows.append(row)
    return rows


def keep_float_weights(qmodel: nn.Module, fp_model: nn.Module) -> bool:
    """Before a stage changes weights non-equivalently (reconstruction, finetuning), keep the float model's
    weights on the quantized model (`qmodel.vitq.float_state`, saved as the checkpoint's `float_state_dict`);
    weights kept earlier stay. True when they were kept now."""
    state = quant_state(qmodel)
    if state.float_state is not None:
        return False
    state.float_state = {k: v.detach().to("cpu", copy=True) for k, v in fp_model.state_dict().items()}
    return True
