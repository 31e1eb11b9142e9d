"""What vitq records on a quantized model, as one attribute (`model.vitq`) instead of loose ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .recipe import Recipe


@dataclass
class QuantState:
    """`recipe`: the model's own copy (methods record layout changes in it, so it describes the final
    model); `calibrated`: every point holds calibrated parameters; `float_state`: the float model's
    weights, kept once a stage changed weights non-equivalently (reconstruction, finetuning), saved as the
    checkpoint's `float_state_dict`."""

    recipe: Recipe
    calibrated: bool = False
    float_state: dict[str, torch.Tensor] | None = None


def quant_state(model: nn.Module) -> QuantState:
    """The model's state; a clear error for a model `vitq.quantize` did not make."""
    state = getattr(model, "vitq", None)
    if not isinstance(state, QuantState):
        raise ValueError(f"{type(model).__name__} was not made by vitq.quantize (it has no recipe): call "
                         "vitq.quantize(model, recipe) first")
    return state


def is_calibrated(model: nn.Module) -> bool:
    state = getattr(model, "vitq", None)
    return isinstance(state, QuantState) and state.calibrated
