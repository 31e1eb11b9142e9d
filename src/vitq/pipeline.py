"""The binding layer: a recipe, the model's adapters and the recipe's method, put together.

`vitq.quant` holds the primitives (grids, observers, points, the recipe as data), `vitq.models` the
adapters, `vitq.methods` the methods; this module, above all three, quantizes a model with a recipe,
calibrates it, reconstructs it and reloads it, calling the method's hooks and the adapters where they
belong. It also fills the recipe's bindings (`vitq.quant.recipe.BINDINGS`), so that building a recipe
checks its method, its options and the adapters' switches. `import vitq` exports what is here.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .distributed import check_same_on_ranks
from .memory import PeakMemory
from .methods import build_method, get_method
from .models import adapter_option_fields, find_roots, rewrite
from .models import units as model_units
from .models.registry import check_adapter_options
from .quant.checkpoint import check_finite, read_quantized
from .quant.modules import QuantSoftmax, QuantWeight
from .quant.ops import iter_points, keep_float_weights, set_mode
from .quant.points import Kind, QuantPoint
from .quant.recipe import BINDINGS, Recipe
from .quant.state import QuantState, is_calibrated, quant_state
from .quant.reconstruct import Fit, ReconstructOptions, UnitObjective, UnitReport, plain_fit
from .quant.records import record_unit
from .recipes import recipe as named_recipe

BINDINGS.register("method class", get_method)
BINDINGS.register("method", build_method)
BINDINGS.register("adapter options", adapter_option_fields)
BINDINGS.register("check adapter options", check_adapter_options)


def quantize(model: nn.Module, recipe: Recipe | Mapping[str, Any] | str, inplace: bool = True) -> nn.Module:
    """Rewrite a float model into quantizable modules, place the recipe's quantizers (a `Recipe`, a mapping,
    or a built-in recipe's name, `vitq.recipes()`), and let the recipe's method prepare them (`Method.prepare`).

    Points start in `off` mode: the model computes exactly what the float model did until `calibrate`.
    A calibrated model is refused: placing a recipe again would silently discard its calibration (and a
    method may already have folded parameters into its weights).
    """
    if is_calibrated(model):
        raise ValueError(
            f"this model is already quantized and calibrated (recipe {quant_state(model).recipe.name!r}); "
            "quantizing it "
            "again would discard that calibration. Quantize a copy of the float model instead "
            "(vitq.quantize(copy.deepcopy(float_model), recipe)), or call vitq.calibrate(model, loop) to "
            "recalibrate with the same recipe")
    if isinstance(recipe, str):
        recipe = named_recipe(recipe)
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_config(recipe)
    model = place(model, recipe, inplace)
    recipe.method_impl().prepare(model)
    return model


def place(model: nn.Module, recipe: Recipe, inplace: bool = True) -> nn.Module:
    """Rewrite the model and configure every point from the recipe as written (no method hook)."""
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
    model.vitq = QuantState(copy.deepcopy(recipe))  # the model's own recipe: methods record layout changes in it
    return model


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], Any], sync: bool = True,
              whole_set: bool | None = None, batches: int | None = None) -> nn.Module:
    """Observe activations while `forward_loop(model)` pushes calibration data through, then freeze.

    What the activation points see is the recipe's `calib_flow`: `float` (every point passes float values
    while observing; under torch.distributed each process observes its shard and the observer states are
    merged, so all ranks end identical), or `quantized` / `quantized_activations` (each point fits its
    grid to everything it has seen so far and passes quantized values on, so downstream points see
    quantized inputs: the published codes that calibrate in one forward with quantization on; weights are
    quantized meanwhile, or kept float with `quantized_activations`). With one calibration batch that is
    exactly their one forward; with several, each point's grid is refitted per batch on all it has seen.
    Under torch.distributed a quantized flow needs every process to feed the whole calibration set (the
    engine does): nothing is merged, and the final check compares the ranks. `whole_set=True` says every
    process feeds the whole set in a float flow too (fewer batches than processes,
    `vitq.distributed.shard_or_replicate`); None: whole for a quantized flow, a shard for a float one.
    The recipe's method hooks run after observing and after freezing (searches, reparameterization); a
    method that searches layer by layer on what the searched layers before it give (NoisyQuant's
    `noisy_flow: sequential`) calls `forward_loop` again from its `replay` hook.
    `batches`, how many batches `forward_loop` feeds (in one process's order), tells modules that act on
    the last calibration batch which one it is (FQ-ViT's LIS during calibration; None: every batch);
    a method that needs the batches in order (`Method.calibrates_in_order`) gets the whole set everywhere.
    """
    state = quant_state(model)
    method = state.recipe.method_impl()
    flow = state.recipe.calib_flow
    configured = [(n, p) for n, p in iter_points(model) if p.configured]
    if not configured:
        raise ValueError("nothing to calibrate: the recipe enables no quant point (is it fp32?)")
    set_mode(model, "off")  # observers see float activations, also when recalibrating
    for m in model.modules():
        if getattr(m, "integer", False):
            m.integer = False
    points = [(n, p) for n, p in configured if p.observer is not None]  # fixed grids need no data
    if whole_set is False and method.calibrates_in_order():
        raise ValueError(f"whole_set=False shards the calibration batches, but {state.recipe.method} needs every "
                         "calibration batch in one order (it acts on the last batch, or searches layer by layer on "
                         "the whole set): leave whole_set unset (or True) and feed every process the whole "
                         "calibration set")
    whole = (flow != "float" or method.calibrates_in_order()) if whole_set is None else whole_set
    for m in model.modules():
        if isinstance(m, QuantSoftmax):
            m.calibration_lis = None if m.calibration_lis is None else (-1 if batches is None else batches - 1)
    for _, p in points:
        p.observer.reset()
        p.observer.shard = (0, 1) if whole else None  # batch keys: one process's order on every rank
    was_training = model.training
    model.eval()
    try:
        for module in model.modules():  # weights first: a broken weight is named before it spoils activations
            if isinstance(module, QuantWeight) and module.weight_quantizer.configured:
                module.weight_quantizer.observe(module.weight)
                if flow == "quantized":  # the forward sees quantized weights
                    module.weight_quantizer.freeze()
                    module.weight_quantizer.set_mode("quant")
        for _, p in configured:
            if p.kind != Kind.WEIGHT:
                fixed = "off" if flow == "float" else "quant"
                p.set_mode(fixed if p.observer is None else ("observe" if flow == "float" else "calibrate"))
        with torch.no_grad():
            forward_loop(model)
        method.after_observe(model)
        for name, p in points:
            if p.observer.empty:
                raise RuntimeError(f"quant point {name}: saw no data during calibration; check that the "
                                   "calibration loop runs the model forward, or disable the point")
            if sync and p.kind != Kind.WEIGHT and not whole:
                p.observer.sync_()
            p.freeze()
        set_mode(model, "quant")
        method.after_freeze(model)
        method.replay(model, forward_loop)
        if sync:  # every rank must hold the parameters one process would have computed
            check_same_on_ranks({f"{n}.{k}": v for n, p in points for k, v in p.quantizer.state_dict().items()},
                                "calibrated quantizer parameters")
        state.calibrated = True
    except BaseException:
        set_mode(model, "off")
        raise
    finally:
        model.train(was_training)
    return model


def float_layers(model: nn.Module) -> list[tuple[str, str]]:
    """Weighted layers no adapter turned into a quantizable twin (a hybrid ViT's ResNet stem, a custom
    head): they stay float under every recipe, which a summary must say rather than hide."""
    # a layer an adapter has a twin for, left float only by one of its switches (a detector's neck under
    # quant.detector_scope=backbone), is not "no adapter covers it"
    covered = {id(m) for _, root, adapter in find_roots(model) for m in root.modules() if adapter.twin_for(m)}
    return [(name, type(m).__name__) for name, m in model.named_modules()
            if not isinstance(m, QuantWeight) and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() >= 2 and not isinstance(m, nn.Embedding) and id(m) not in covered]


def load_quantized(model: nn.Module, path: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Rebuild a quantized model from its float architecture and a `save_quantized` file (or the dict
    `read_quantized` returned for it, so a caller that already read the file need not read it again).

    The stored recipe describes the final model (after any reparameterization), so points are placed
    from it without the method's `prepare` hook; parameters a method added (a folded bias) are created.
    """
    if isinstance(path, Mapping):
        ckpt = path
        check_finite(ckpt, "the checkpoint")
    else:
        ckpt = read_quantized(path)
    recipe = Recipe.from_config(ckpt["recipe"])
    place(model, recipe)
    state = ckpt["state_dict"]
    for name, module in model.named_modules():
        if isinstance(module, QuantWeight) and module.bias is None and f"{name}.bias" in state:
            module.bias = nn.Parameter(torch.zeros(module.out_channels if hasattr(module, "out_channels")
                                                   else module.out_features))
    recipe.method_impl().before_load(model, state)  # wrappers or buffers the method added
    model.load_state_dict(state, strict=True)
    set_mode(model, "quant")
    modules = dict(model.named_modules())
    saved = ckpt.get("integer", [])  # modules that ran the integer kernels when saved, and how
    for name, arithmetic in (saved.items() if isinstance(saved, dict) else ((n, "exact") for n in saved)):
        modules[name].integer = arithmetic if modules[name].can_run_integer() else False
    recipe.method_impl().after_load(model)
    model.vitq.calibrated = True
    model.vitq.float_state = ckpt.get("float_state_dict")
    return model


def reconstruct(qmodel: nn.Module, fp_model: nn.Module, batches: Iterable[Any],
                run_batch: Callable[[nn.Module, Any], Any], options: ReconstructOptions | None = None,
                device: torch.device | str | None = None, fit: Fit | None = None,
                units: list[str] | None = None,
                on_unit: Callable[[UnitReport], None] | None = None) -> list[UnitReport]:
    """Reconstruct every unit of a calibrated `qmodel` against `fp_model` (its float original), in order.

    `batches` is re-iterated once per unit (a DataLoader or a list); `run_batch(model, batch)` pushes one
    batch through a model. `units` restricts the pass to those unit names (default: all the adapters
    list). The float weights before the first pass are kept as `qmodel.vitq.float_state`, so a saved
    checkpoint still yields the true float model (`vitq.quant.checkpoint.float_state_dict`).
    """
    options = options or ReconstructOptions()
    if not is_calibrated(qmodel):
        raise ValueError("reconstruct needs a calibrated model: call vitq.calibrate(qmodel, loop) first")
    device = torch.device(device) if device is not None else next(qmodel.parameters()).device
    fit = fit or plain_fit
    keep_float_weights(qmodel, fp_model)
    q_units, fp_units = dict(model_units(qmodel)), dict(model_units(fp_model))
    names = [n for n, _ in model_units(qmodel)]
    if units is not None:
        unknown = sorted(set(units) - set(names))
        if unknown:
            raise ValueError(f"unknown reconstruction unit(s) {unknown}; the model's units: {', '.join(names)}")
        names = [n for n in names if n in units]
    # units without a quantized point (e.g. a detector's heads outside quant.detector_scope) stay as they are
    names = [n for n in names if any(isinstance(p, QuantPoint) and p.configured and p.mode != "off"
                                     for p in q_units[n].modules())]
    if set(names) - set(fp_units):
        raise ValueError("fp_model does not have the quantized model's units: pass the float model qmodel was made from")
    q_was, fp_was = qmodel.training, fp_model.training
    qmodel.eval(), fp_model.eval()
    reports = []
    try:
        for name in names:
            qmodel.to(device), fp_model.to(device)
            start = time.perf_counter()
            with PeakMemory(device) as mem:
                o = options
                data = record_unit(fp_model, fp_units[name], qmodel if o.input_source != "float" else None,
                                   q_units[name] if o.input_source != "float" else None, batches, run_batch,
                                   device, want_fp_inputs=o.input_source != "quant")
                objective = UnitObjective(q_units[name], data, o).to(device)
                try:
                    if not objective.trains:
                        continue
                    before = objective.evaluate(device)
                    torch.manual_seed(o.seed + len(reports))  # drop and mix masks: reproducible per unit
                    fit(objective, device, name)
                    q_units[name].to(device)  # a trainer may have moved it back to the CPU
                    after = objective.evaluate(device)
                finally:
                    objective.finish()
                cache_mib, n_params, groups = data.nbytes() / 2**20, objective.n_params, len(data.sizes)
                del data, objective
            report = UnitReport(name, round(time.perf_counter() - start, 3), round(cache_mib, 2),
                                round(mem.peak / 2**20, 1), before, after, n_params, groups)
            reports.append(report)
            if on_unit is not None:
                on_unit(report)
    finally:
        qmodel.train(q_was), fp_model.train(fp_was)
    return reports
