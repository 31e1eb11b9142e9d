"""vitq: post-training quantization and quantization-aware finetuning of vision transformers.

    qmodel = vitq.quantize(model, "repq")          # or vitq.recipe("repq", w_bits=4, a_bits=4)
    vitq.calibrate(qmodel, forward_loop)            # forward_loop(model) pushes calibration data through
    vitq.summary(qmodel)
    vitq.reconstruct(qmodel, float_model, batches, run_batch, vitq.ReconstructOptions(adaround=True))
"""
from typing import Any, Mapping

from torch import nn

from . import mmcv_kernels

mmcv_kernels.install()  # before anything imports mmcv.ops: its kernels from torchvision where mmcv-lite is installed

from .quant import (CalibrationError, Kind, PointSpec, Recipe, ReconstructOptions, calibrate, iter_points, load_quantized,
                    reconstruct, save_quantized, set_integer, set_mode, summary)
from .quant import quantize as _quantize
from .recipes import recipe, recipes
from .recipes import recipe as _recipe_named

__version__ = "0.1.0"


def quantize(model: nn.Module, recipe: "Recipe | Mapping[str, Any] | str", inplace: bool = True) -> nn.Module:
    """`vitq.quant.quantize`, also taking a built-in recipe's name (`vitq.recipes()`)."""
    return _quantize(model, _recipe_named(recipe) if isinstance(recipe, str) else recipe, inplace)


__all__ = ["CalibrationError", "Kind", "PointSpec", "Recipe", "ReconstructOptions", "calibrate", "iter_points", "load_quantized",
           "quantize", "recipe", "recipes", "reconstruct", "save_quantized", "set_integer", "set_mode", "summary"]
