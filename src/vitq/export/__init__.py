"""Deployment: a calibrated model as ONNX with QuantizeLinear / DequantizeLinear pairs, and its checks."""
from .onnx_model import (DEFAULT_OPSET, MIN_OPSET, ExportError, ExportReport, check_opset, evaluating, export_onnx,
                         export_problems)
from .verify import compare, model_input, session, structure_problems

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "ExportError", "ExportReport", "check_opset", "compare", "evaluating",
           "export_onnx", "export_problems", "model_input", "session", "structure_problems"]
