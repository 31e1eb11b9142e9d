"""vitq: post-training quantization and quantization-aware finetuning of vision transformers.

    qmodel = vitq.quantize(model, recipe)
    vitq.calibrate(qmodel, forward_loop)   # forward_loop(model) pushes calibration data through
    vitq.summary(qmodel)
"""
from .quant import (Kind, PointSpec, Recipe, calibrate, iter_points, load_quantized, quantize,
                    save_quantized, set_integer, set_mode, summary)

__version__ = "0.1.0"
__all__ = ["Kind", "PointSpec", "Recipe", "calibrate", "iter_points", "load_quantized", "quantize",
           "save_quantized", "set_integer", "set_mode", "summary"]
