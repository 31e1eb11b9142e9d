"""vitq: post-training quantization and quantization-aware finetuning of vision transformers.

    qmodel = vitq.quantize(model, "repq")          # or vitq.recipe("repq", w_bits=4, a_bits=4)
    vitq.calibrate(qmodel, forward_loop)            # forward_loop(model) pushes calibration data through
    vitq.summary(qmodel)
    vitq.reconstruct(qmodel, float_model, batches, run_batch, vitq.ReconstructOptions(adaround=True))
"""
from . import mmcv_kernels

mmcv_kernels.install()  # before anything imports mmcv.ops: its kernels from torchvision where mmcv-lite is installed

from .pipeline import calibrate, float_layers, load_quantized, quantize, reconstruct
from .quant import (CalibrationError, Kind, PointSpec, Recipe, ReconstructOptions, iter_points, read_quantized,
                    save_quantized, set_integer, set_mode, summary)
from .recipes import recipe, recipes
from .export import export_onnx
from .sensitivity import SensitivityReport, analyze

__version__ = "0.1.0"

__all__ = ["CalibrationError", "Kind", "PointSpec", "Recipe", "ReconstructOptions", "SensitivityReport", "analyze",
           "export_onnx",
           "calibrate", "float_layers", "iter_points", "load_quantized", "quantize", "read_quantized", "recipe",
           "recipes", "reconstruct", "save_quantized", "set_integer", "set_mode", "summary"]
