"""The public entry points: quantize, calibrate, summary, and the quantized checkpoint."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..distributed import check_same_on_ranks
from ..files import written_atomically
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
    """Rewrite a float model into quantizable modules, place the recipe's quantizers, and let the
    recipe's method prepare them (`Method.prepare`).

    Points start in `off` mode: the model computes exactly what the float model did until `calibrate`.
    A calibrated model is refused: placing a recipe again would silently discard its calibration (and a
    method may already have folded parameters into its weights).
    """
    if getattr(model, "vitq_calibrated", False):
        raise ValueError(
            f"this model is already quantized and calibrated (recipe {model.vitq_recipe.name!r}); quantizing it "
            "again would discard that calibration. Quantize a copy of the float model instead "
            "(vitq.quantize(copy.deepcopy(float_model), recipe)), or call vitq.calibrate(model, loop) to "
            "recalibrate with the same recipe")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_config(recipe)
    model = place(model, recipe, inplace)
    recipe.method_impl().prepare(model)
    return model


def place(model: nn.Module, recipe: Recipe, inplace: bool = True) -> nn.Module:
    """Rewrite the model and configure every point from the recipe as written (no method hook)."""
    from ..models import rewrite  # adapters import timm; keep `vitq.quant` importable without it

    if not inplace:
        model = copy.deepcopy(model)
    rewrite(model, recipe.adapter_options)
    points = list(iter_points(model))
    if not points:
        raise ValueError(
            f"{type(model).__name__} has no quantizable blocks (no Linear, Conv2d, LayerNorm or attention "
            "module that vitq knows); check the model or register a twin for its layers"
        )
    specs = recipe.assign([n for n, _ in points], [p.kind for _, p in points])
    for (name, point), spec in zip(points, specs):
        point.path = name
        point.configure(spec)
    model.vitq_recipe = copy.deepcopy(recipe)  # the model's own: methods record layout changes in it
    return model


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every configured point to `off` (float), `observe` or `quant`."""
    for _, point in iter_points(model):
        point.set_mode(mode)


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], Any], sync: bool = True) -> nn.Module:
    """Observe activations while `forward_loop(model)` pushes calibration data through, then freeze.

    Activation observers see float activations (every point passes through while observing). Under
    torch.distributed, observer states are merged across ranks first, so all ranks end identical.
    The recipe's method hooks run after observing and after freezing (searches, reparameterization).
    """
    recipe = getattr(model, "vitq_recipe", None)
    if recipe is None:
        raise ValueError("model was not made by vitq.quantize (it has no recipe): call vitq.quantize first")
    method = recipe.method_impl()
    points = [(n, p) for n, p in iter_points(model) if p.configured]
    if not points:
        raise ValueError("nothing to calibrate: the recipe enables no quant point (is it fp32?)")
    set_mode(model, "off")  # observers see float activations, also when recalibrating
    for m in model.modules():
        if getattr(m, "integer", False):
            m.integer = False
    points = [(n, p) for n, p in points if p.observer is not None]  # fixed grids need no data
    for _, p in points:
        p.observer.reset()
        p.set_mode("observe" if p.kind != Kind.WEIGHT else "off")
    was_training = model.training
    model.eval()
    try:
        for module in model.modules():  # weights first: a broken weight is named before it spoils activations
            if isinstance(module, _QuantWeight) and module.weight_quantizer.configured:
                module.weight_quantizer.observe(module.weight)
        with torch.no_grad():
            forward_loop(model)
        method.after_observe(model)
        for name, p in points:
            if p.observer.empty:
                raise RuntimeError(f"quant point {name}: saw no data during calibration; check that the "
                                   "calibration loop runs the model forward, or disable the point")
            if sync and p.kind != Kind.WEIGHT:
                p.observer.sync_()
            p.freeze()
        set_mode(model, "quant")
        method.after_freeze(model)
        if sync:  # every rank must hold the parameters one process would have computed
            check_same_on_ranks({f"{n}.{k}": v for n, p in points for k, v in p.quantizer.state_dict().items()},
                                "calibrated quantizer parameters")
        model.vitq_calibrated = True
    except BaseException:
        set_mode(model, "off")
        raise
    finally:
        model.train(was_training)
    return model


@torch.no_grad()
def refit_weight(module: nn.Module) -> None:
    """Calibrate a layer's weight quantizer again after its weight changed (e.g. a reparameterization)."""
    point = module.weight_quantizer
    if point.configured and point.observer is not None:
        point.observer.reset()
        point.observe(module.weight)
        point.freeze()


def set_integer(model: nn.Module, enabled: bool = True) -> int:
    """Run LayerNorms and softmaxes through the integer kernels; returns how many modules switched.

    Needs PTF at the LayerNorm inputs with a per-tensor uniform quantizer on the layer each feeds, and a
    uniform score quantizer with log2 probabilities at each softmax (`quant=fqvit`). Every kernel's
    calibrated grid is checked first: one the integer arithmetic cannot represent fails here, named,
    instead of at the first evaluation batch.
    """
    from .modules import QuantLayerNorm, QuantSoftmax

    ready = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (QuantLayerNorm, QuantSoftmax)) and m.can_run_integer()]
    if enabled:
        if not ready:
            raise ValueError("no LayerNorm or softmax can run integer-only: that needs a calibrated model with "
                             "PTF LayerNorm inputs and log2 attention probabilities (quant=fqvit, ptf and lis on)")
        problems = [f"{n}: {msg}" for n, m in ready if (msg := m.integer_problem()) is not None]
        if problems:
            raise ValueError("the integer kernels cannot run this calibrated model:\n  " + "\n  ".join(problems[:5])
                             + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""))
    for module in model.modules():
        if isinstance(module, (QuantLayerNorm, QuantSoftmax)):
            module.integer = False
    for _, module in ready:
        module.integer = bool(enabled)
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


def float_layers(model: nn.Module) -> list[tuple[str, str]]:
    """Weighted layers no adapter turned into a quantizable twin (a hybrid ViT's ResNet stem, a custom
    head): they stay float under every recipe, which a summary must say rather than hide."""
    from ..models import find_roots

    # a layer an adapter has a twin for, left float only by one of its switches (a detector's neck under
    # quant.detector_scope=backbone), is not "no adapter covers it"
    covered = {id(m) for _, root, adapter in find_roots(model) for m in root.modules() if adapter.twin_for(m)}
    return [(name, type(m).__name__) for name, m in model.named_modules()
            if not isinstance(m, _QuantWeight) and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() >= 2 and not isinstance(m, nn.Embedding) and id(m) not in covered]


def save_quantized(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write float weights, every quantizer's parameters and the recipe to one file, atomically.

    `meta` (e.g. the model, task and quant configs of the run) is stored alongside, untouched.
    """
    recipe = getattr(model, "vitq_recipe", None)
    if recipe is None:
        raise ValueError("model was not made by vitq.quantize (it has no recipe)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    integer = [n for n, m in model.named_modules() if getattr(m, "integer", False)]
    with written_atomically(path) as tmp:
        ckpt = {"format": CHECKPOINT_FORMAT, "recipe": recipe.to_config(), "integer": integer,
                "state_dict": model.state_dict(), "meta": dict(meta or {})}
        float_state = getattr(model, "vitq_float_state", None)
        if float_state is not None:  # weights were changed non-equivalently (reconstruction): keep the float ones
            ckpt["float_state_dict"] = float_state
        torch.save(ckpt, tmp)
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
    _check_finite(ckpt, str(path))
    return ckpt


def _check_finite(ckpt: Mapping[str, Any], where: str) -> None:
    """A NaN scale makes a model whose every output is NaN, and its evaluation would still 'succeed'."""
    broken = [k for k, t in ckpt["state_dict"].items()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        raise ValueError(f"{where} holds non-finite values (NaN or Inf) in {len(broken)} tensor(s): "
                         f"{', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}; it cannot give a working "
                         "model: calibrate again")


def load_quantized(model: nn.Module, path: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Rebuild a quantized model from its float architecture and a `save_quantized` file (or the dict
    `read_quantized` returned for it, so a caller that already read the file need not read it again).

    The stored recipe describes the final model (after any reparameterization), so points are placed
    from it without the method's `prepare` hook; parameters a method added (a folded bias) are created.
    """
    if isinstance(path, Mapping):
        ckpt = path
        _check_finite(ckpt, "the checkpoint")
    else:
        ckpt = read_quantized(path)
    recipe = Recipe.from_config(ckpt["recipe"])
    place(model, recipe)
    state = ckpt["state_dict"]
    for name, module in model.named_modules():
        if isinstance(module, _QuantWeight) and module.bias is None and f"{name}.bias" in state:
            module.bias = nn.Parameter(torch.zeros(module.out_channels if hasattr(module, "out_channels")
                                                   else module.out_features))
    recipe.method_impl().before_load(model, state)  # wrappers or buffers the method added
    model.load_state_dict(state, strict=True)
    set_mode(model, "quant")
    modules = dict(model.named_modules())
    for name in ckpt.get("integer", []):  # modules that ran the integer kernels when saved
        modules[name].integer = modules[name].can_run_integer()
    recipe.method_impl().after_load(model)
    model.vitq_calibrated = True
    if ckpt.get("float_state_dict") is not None:
        model.vitq_float_state = ckpt["float_state_dict"]
    return model


def keep_float_weights(qmodel: nn.Module, fp_model: nn.Module) -> bool:
    """Before a stage changes weights non-equivalently (reconstruction, finetuning), keep the float model's
    weights on the quantized model (`vitq_float_state`, saved as the checkpoint's `float_state_dict`);
    weights kept earlier stay. True when they were kept now."""
    if getattr(qmodel, "vitq_float_state", None) is not None:
        return False
    qmodel.vitq_float_state = {k: v.detach().to("cpu", copy=True) for k, v in fp_model.state_dict().items()}
    return True


def float_state_dict(ckpt: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights inside a quantized checkpoint, keyed for the float architecture `model`: the
    weights from before reconstruction where a stage changed them (`float_state_dict`), else the stored
    weights (a float-equivalent fold, such as a LayerNorm reparameterization, keeps the float model's function)."""
    own = model.state_dict()
    source = ckpt.get("float_state_dict") or ckpt["state_dict"]
    state = {k: v for k, v in source.items() if k in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"the quantized checkpoint does not fit {type(model).__name__}: missing "
                         f"{', '.join(missing[:5])}; pass the model= the checkpoint was made with")
    return state
