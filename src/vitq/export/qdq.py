"""QuantizeLinear / DequantizeLinear as traceable functions: in PyTorch they compute the point's own fake
quantization; in the ONNX graph they are the standard operator pair (with a clip first where the grid is
narrower than its 8-bit storage)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

STORAGE = {True: (torch.int8, -128, 127), False: (torch.uint8, 0, 255)}  # signed grid -> int8, else uint8


@dataclass(frozen=True)
class QDQParams:
    """One uniform grid as ONNX stores it: `scale` (float32) and `zero_point` (int8 / uint8) scalars for a
    per-tensor grid, vectors along `axis` (non-negative) for a per-channel one; `qmin`, `qmax` the grid's
    codes, narrower than the storage type's below 8 bits; `noise` an addend before quantizing, along `noise_axis`."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None = None
    noise: torch.Tensor | None = None
    noise_axis: int = -1  # the noise's channel axis (its own, whatever the grid's granularity)

    @property
    def narrow(self) -> bool:
        _, lo, hi = STORAGE[self.zero_point.dtype == torch.int8]
        return (self.qmin, self.qmax) != (lo, hi)

    def shaped(self, t: torch.Tensor, rank: int, axis: int | None = None) -> torch.Tensor:
        """A per-channel vector laid out to broadcast along the axis of a rank-`rank` tensor."""
        axis = self.axis if axis is None else axis
        if axis is None or t.dim() == 0:
            return t
        shape = [1] * rank
        shape[axis] = -1
        return t.reshape(shape)

    def bounds(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The real values of the lowest and highest code: a clip to them keeps the codes in the grid."""
        z = self.zero_point.float()
        return (self.shaped((self.qmin - z) * self.scale, rank), self.shaped((self.qmax - z) * self.scale, rank))


def _constants(g, p: QDQParams):  # noqa: ANN001, ANN202
    return g.op("Constant", value_t=p.scale), g.op("Constant", value_t=p.zero_point)


def _axis(p: QDQParams) -> dict:
    return {} if p.axis is None else {"axis_i": p.axis}


class QuantDequant(torch.autograd.Function):
    """Fake quantization of an activation: the grid's arithmetic in PyTorch, [Add noise] -> [Clip] ->
    QuantizeLinear -> DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: QDQParams) -> torch.Tensor:  # noqa: ANN001
        rank = x.dim()
        scale, zero_point = p.shaped(p.scale, rank), p.shaped(p.zero_point.float(), rank)
        if p.noise is not None:
            x = x + p.shaped(p.noise.float(), rank, p.noise_axis % rank)
        codes = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, p.qmin, p.qmax)
        return (codes - zero_point) * scale

    @staticmethod
    def symbolic(g, x, p: QDQParams):  # noqa: ANN001, ANN205
        rank = x.type().dim()
        if p.noise is not None:
            x = g.op("Add", x, g.op("Constant", value_t=p.shaped(p.noise.float(), rank, p.noise_axis % rank)))
        if p.narrow:
            lo, hi = p.bounds(rank)
            if p.axis is None:
                x = g.op("Clip", x, g.op("Constant", value_t=lo.reshape(())), g.op("Constant", value_t=hi.reshape(())))
            else:
                x = g.op("Min", g.op("Max", x, g.op("Constant", value_t=lo)), g.op("Constant", value_t=hi))
        scale, zero_point = _constants(g, p)
        q = g.op("QuantizeLinear", x, scale, zero_point, **_axis(p))
        return g.op("DequantizeLinear", q, scale, zero_point, **_axis(p))


class Dequant(torch.autograd.Function):
    """Integer weight codes to real values: (codes - zero_point) * scale; DequantizeLinear of a constant in
    ONNX, so the file stores the weights as 8-bit codes."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, p: QDQParams) -> torch.Tensor:  # noqa: ANN001
        rank = codes.dim()
        return (codes.float() - p.shaped(p.zero_point.float(), rank)) * p.shaped(p.scale, rank)

    @staticmethod
    def symbolic(g, codes, p: QDQParams):  # noqa: ANN001, ANN205
        scale, zero_point = _constants(g, p)
        return g.op("DequantizeLinear", codes, scale, zero_point, **_axis(p))
