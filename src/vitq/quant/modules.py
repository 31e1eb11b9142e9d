"""Quantizable twins of the float modules a vision transformer is made of.

Each twin is its float class plus quant points. `convert(module)` turns a float module into its twin in
place (the class is swapped, parameters and state-dict keys stay), so a rewritten model still loads the
float checkpoints it was made from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .points import Kind, QuantPoint


class _Convertible:
    """In-place conversion from the float parent class: swap the class, then add the points."""

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        module.__class__ = cls
        module._add_points()  # type: ignore[attr-defined]
        return module

    def _add_points(self) -> None:
        raise NotImplementedError


class _QuantWeight(_Convertible):
    """Shared by QuantLinear and QuantConv2d: quantized input and weight, cached weight at inference."""

    weight: nn.Parameter

    def _add_points(self) -> None:
        self.input_quantizer = QuantPoint(Kind.LINEAR_INPUT)
        self.weight_quantizer = QuantPoint(Kind.WEIGHT)
        self._wcache: tuple[tuple, torch.Tensor] | None = None

    def quantized_weight(self) -> torch.Tensor:
        """Under no_grad the fake-quantized weight is computed once and reused until the weight or the
        quantizer changes (tracked by tensor versions; writes through `.data` bypass them, so change
        weights with in-place ops under torch.no_grad())."""
        point = self.weight_quantizer
        if point.mode != "quant":
            return self.weight
        if torch.is_grad_enabled():
            return point(self.weight)
        q = point.quantizer
        key = (self.weight.data_ptr(), self.weight._version, q.scale.data_ptr(), q.scale._version,
               q.zero_point.data_ptr(), q.zero_point._version)
        if self._wcache is None or self._wcache[0] != key:
            self._wcache = (key, point(self.weight).detach())
        return self._wcache[1]

    def __getstate__(self) -> dict:  # deepcopy / pickle without the cache
        state = self.__dict__.copy()
        state["_wcache"] = None
        return state


class QuantLinear(_QuantWeight, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv2d(_QuantWeight, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantLayerNorm(_Convertible, nn.LayerNorm):
    """LayerNorm whose input (the residual stream) is a quant point."""

    def _add_points(self) -> None:
        self.input_quantizer = QuantPoint(Kind.NORM_INPUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(self.input_quantizer(x), self.normalized_shape, self.weight, self.bias, self.eps)


class QuantMatMul(nn.Module):
    """a @ b with each operand a quant point (None: the operand is quantized upstream)."""

    def __init__(self, a_kind: str | None = Kind.MATMUL_INPUT, b_kind: str | None = Kind.MATMUL_INPUT) -> None:
        super().__init__()
        self.a_quantizer = QuantPoint(a_kind) if a_kind else None
        self.b_quantizer = QuantPoint(b_kind) if b_kind else None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return a @ b


class QuantSoftmax(nn.Module):
    """Softmax whose output (the attention probabilities) is a quant point."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.output_quantizer = QuantPoint(Kind.SOFTMAX_OUTPUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(x.softmax(dim=self.dim))
