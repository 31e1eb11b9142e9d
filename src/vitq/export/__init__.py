"""Deployment: a calibrated model as ONNX with QuantizeLinear / DequantizeLinear pairs, and its checks."""
from .onnx_model import DEFAULT_OPSET, MIN_OPSET, ExportError, ExportReport, export_onnx, export_problems
from .verify import compare, session, structure_problems

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "ExportError", "ExportReport", "compare", "export_onnx", "export_problems",
           "session", "structure_problems"]
