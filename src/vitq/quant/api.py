"""The public entry points: quantize, calibrate, summary, and the quantized checkpoint."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .modules import _QuantWeight
from .points import Kind, QuantPoint
from .recipe import Recipe

CHECKPOINT_FORMAT = "vitq-quantized/1"


def point_name(module_path: str) -> str:
    """`blocks.0.attn.qkv.input_quantizer` -> `blocks.0.attn.qkv.input`."""
    return module_path[: -len("_quantizer")] if module_path.endswith("_quantizer") else module_path


def iter_points(model: nn.Module) -> Iterator[tuple[str, QuantPoint]]:
    for path, module in model.named_modules():
        if isinstance(module, QuantPoint):
            yield point_name(path), module


def quantize(model: nn.Module, recipe: Recipe | Mapping[str, Any], inplace: bool = True) -> nn.Module:
    """Rewrite a float model into quantizable modules and place the recipe's quantizers.

    Points start in `off` mode: the model computes exactly what the float model did until `calibrate`.
    """
    from ..models import rewrite  # adapters import timm; keep `vitq.quant` importable without it

    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_config(recipe)
    if not inplace:
        model = copy.deepcopy(model)
    rewrite(model)
    points = list(iter_points(model))
    if not points:
        raise ValueError(
            f"{type(model).__name__} has no quantizable blocks (no Linear, Conv2d, LayerNorm or attention "
            "module that vitq knows); check the model or register a twin for its layers"
        )
    recipe.check_patterns([n for n, _ in points], [p.kind for _, p in points])
    for name, point in points:
        point.configure(recipe.resolve(name, point.kind))
    model.vitq_recipe = recipe
    return model


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every configured point to `off` (float), `observe` or `quant`."""
    for _, point in iter_points(model):
        point.set_mode(mode)


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], Any], sync: bool = True) -> nn.Module:
    """Observe activations while `forward_loop(model)` pushes calibration data through, then freeze.

    Activation observers see float activations (every point passes through while observing). Under
    torch.distributed, observer states are merged across ranks first, so all ranks end identical.
    """
    points = [(n, p) for n, p in iter_points(model) if p.configured]
    if not points:
        raise ValueError("nothing to calibrate: the recipe enables no quant point (is it fp32?)")
    set_mode(model, "off")  # observers see float activations, also when recalibrating
    integer = [m for m in model.modules() if getattr(m, "integer", False)]
    for m in integer:
        m.integer = False
    points = [(n, p) for n, p in points if p.observer is not None]  # fixed grids need no data
    for _, p in points:
        p.observer.reset()
        p.set_mode("observe" if p.kind != Kind.WEIGHT else "off")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward_loop(model)
        for module in model.modules():
            if isinstance(module, _QuantWeight) and module.weight_quantizer.configured:
                module.weight_quantizer.observer.observe(module.weight)
        for name, p in points:
            if p.observer.empty:
                raise RuntimeError(f"quant point {name}: saw no data during calibration; check that the "
                                   "calibration loop runs the model forward, or disable the point")
            if sync and p.kind != Kind.WEIGHT:
                p.observer.sync_()
            p.freeze()
    except BaseException:
        set_mode(model, "off")
        raise
    finally:
        model.train(was_training)
    set_mode(model, "quant")
    for m in integer:
        m.integer = m.can_run_integer()
    return model


def set_integer(model: nn.Module, enabled: bool = True) -> int:
    """Run LayerNorms and softmaxes through the integer kernels (FQ-ViT); returns how many modules switched.

    Needs PTF at the LayerNorm inputs with a per-tensor uniform quantizer on the layer each feeds, and a
    uniform score quantizer with log2 probabilities at each softmax (`quant=fqvit`).
    """
    from .modules import QuantLayerNorm, QuantSoftmax

    switched = 0
    for module in model.modules():
        if isinstance(module, (QuantLayerNorm, QuantSoftmax)):
            module.integer = bool(enabled) and module.can_run_integer()
            switched += module.integer
    if enabled and not switched:
        raise ValueError("no LayerNorm or softmax can run integer-only: that needs a calibrated model with "
                         "PTF LayerNorm inputs and log2 attention probabilities (quant=fqvit, ptf and lis on)")
    return switched


def summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quant point: name, kind, mode, bits, granularity, observer and scale range."""
    rows = []
    for name, p in iter_points(model):
        row: dict[str, Any] = {"name": name, "kind": p.kind, "mode": p.mode}
        if p.configured:
            q, s = p.quantizer, p.spec
            scale = getattr(q, "scale", None)
            row.update(bits=q.bits, granularity=s.granularity if s.quantizer == "uniform" else s.quantizer,
                       symmetric=s.symmetric, signed=s.signed, observer=s.observer if p.observer else None,
                       scale_min=None if scale is None else float(scale.min()),
                       scale_max=None if scale is None else float(scale.max()))
        else:
            row.update(bits=None, granularity="float", symmetric=None, signed=None, observer=None,
                       scale_min=None, scale_max=None)
        rows.append(row)
    return rows


def save_quantized(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write float weights, every quantizer's parameters and the recipe to one file, atomically.

    `meta` (e.g. the model, task and quant configs of the run) is stored alongside, untouched.
    """
    recipe = getattr(model, "vitq_recipe", None)
    if recipe is None:
        raise ValueError("model was not made by vitq.quantize (it has no recipe)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    integer = [n for n, m in model.named_modules() if getattr(m, "integer", False)]
    torch.save({"format": CHECKPOINT_FORMAT, "recipe": recipe.to_config(), "integer": integer,
                "state_dict": model.state_dict(), "meta": dict(meta or {})}, tmp)
    os.replace(tmp, path)
    return path


def read_quantized(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint {path} does not exist; pass the quantized.ckpt of a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # not a torch file at all
        raise ValueError(f"{path} is not a vitq quantized checkpoint (cannot be read: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vitq quantized checkpoint (expected format {CHECKPOINT_FORMAT})")
    return ckpt


def load_quantized(model: nn.Module, path: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Rebuild a quantized model from its float architecture and a `save_quantized` file (or the dict
    `read_quantized` returned for it, so a caller that already read the file need not read it again)."""
    ckpt = path if isinstance(path, Mapping) else read_quantized(path)
    quantize(model, Recipe.from_config(ckpt["recipe"]))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    set_mode(model, "quant")
    modules = dict(model.named_modules())
    for name in ckpt.get("integer", []):  # modules that ran the integer kernels when saved
        modules[name].integer = modules[name].can_run_integer()
    return model


def float_state_dict(ckpt: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights inside a quantized checkpoint, keyed for the float architecture `model`."""
    own = model.state_dict()
    state = {k: v for k, v in ckpt["state_dict"].items() if k in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"the quantized checkpoint does not fit {type(model).__name__}: missing "
                         f"{', '.join(missing[:5])}; pass the model= the checkpoint was made with")
    return state
