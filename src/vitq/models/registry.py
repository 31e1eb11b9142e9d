"""Registries: float module class -> quantizable twin, float model class -> adapter family.

Adapters (one file per model family) register the classes they know; `rewrite` walks the model once
and converts every module whose exact class has a twin.
"""
from __future__ import annotations

from torch import nn

from ..quant.modules import QuantConv2d, QuantLayerNorm, QuantLinear

MODULE_TWINS: dict[type[nn.Module], type] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.LayerNorm: QuantLayerNorm,
}
MODEL_FAMILIES: dict[type[nn.Module], str] = {}


class UnsupportedModelError(TypeError):
    pass


def register_twin(float_cls: type[nn.Module], twin: type) -> None:
    MODULE_TWINS[float_cls] = twin


def register_family(model_cls: type[nn.Module], family: str) -> None:
    MODEL_FAMILIES[model_cls] = family


def family_of(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls in MODEL_FAMILIES:
            return MODEL_FAMILIES[cls]
    known = ", ".join(sorted(f"{c.__module__}.{c.__name__}" for c in MODEL_FAMILIES))
    raise UnsupportedModelError(
        f"vitq has no adapter for {type(model).__module__}.{type(model).__name__}. "
        f"Known model classes: {known}. Add one in src/vitq/models/ (see docs/adding.md)."
    )


def rewrite(model: nn.Module) -> str:
    """Convert every known module in place; returns the model family."""
    family = family_of(model)
    for module in list(model.modules()):
        twin = MODULE_TWINS.get(type(module))
        if twin is not None:
            twin.convert(module)
    for module in model.modules():  # twins that wire themselves to their (now converted) children
        hook = getattr(module, "after_rewrite", None)
        if callable(hook):
            hook()
    return family
