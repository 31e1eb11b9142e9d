"""The quantization primitives: pure PyTorch, usable without Hydra or Lightning, importing nothing above
themselves. Binding a recipe to a model (`vitq.quantize`, `vitq.calibrate`, ...) is `vitq.pipeline`."""
from . import log_grids, sample_observers  # noqa: F401  (register the log grids and the sample-based observers)
from .checkpoint import CHECKPOINT_FORMAT, float_state_dict, read_quantized, save_quantized
from .observers import OBSERVERS, Observer, make_observer, register_observer
from .ops import iter_points, keep_float_weights, refit_weight, set_integer, set_mode, summary
from .points import SCOPES, CalibrationError, Kind, PointSpec, QuantAct, QuantPoint
from .quantizers import UniformQuantizer
from .recipe import Recipe
from .reconstruct import ReconstructOptions, UnitReport
from .state import QuantState, is_calibrated, quant_state

__all__ = ["CHECKPOINT_FORMAT", "CalibrationError", "Kind", "OBSERVERS", "Observer", "PointSpec", "QuantAct",
           "QuantPoint", "QuantState", "Recipe", "ReconstructOptions", "SCOPES", "UniformQuantizer", "UnitReport",
           "float_state_dict", "is_calibrated", "iter_points", "keep_float_weights", "make_observer", "quant_state",
           "read_quantized", "refit_weight", "register_observer", "save_quantized", "set_integer", "set_mode",
           "summary"]
