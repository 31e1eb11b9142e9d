"""The quantization library: pure PyTorch, usable without Hydra or Lightning."""
from .api import (calibrate, float_layers, iter_points, load_quantized, quantize, read_quantized, save_quantized, set_integer,
                  set_mode, summary)
from .observers import OBSERVERS, Observer, make_observer, register_observer
from .points import SCOPES, CalibrationError, Kind, PointSpec, QuantAct, QuantPoint
from .quantizers import UniformQuantizer
from .recipe import Recipe
from .reconstruct import ReconstructOptions, UnitReport, reconstruct

__all__ = ["OBSERVERS", "SCOPES", "CalibrationError", "Kind", "Observer", "PointSpec", "QuantAct", "QuantPoint", "Recipe", "ReconstructOptions", "UnitReport",
           "UniformQuantizer", "calibrate", "float_layers", "iter_points", "load_quantized", "make_observer", "quantize",
           "read_quantized", "reconstruct", "register_observer", "save_quantized", "set_integer", "set_mode", "summary"]
