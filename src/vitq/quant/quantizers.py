"""Quantizer grids: one class each, in a registry recipes name (`quantizer: uniform | ptf | log2 | log_sqrt2`).

A grid owns its integer codes (bits, signedness) and its parameters, and knows how to derive them from
a real-valued range. Observers decide the range; grids never look at data. Each grid exposes:
- `forward`: fake quantization, straight-through in training;
- `probe()`: a copy laid out channels-first (`[C, N]`) that search calibrators (OMSE, quantile) score
  candidate ranges with, so a search always scores the point's real grid;
- `export_params()`: what an exporter needs to write the point as integer arithmetic.
Adding a grid is one class plus `@register_grid`, nothing else; the log-domain grids (log2, log_sqrt2)
are in `log_grids.py`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..registry import Registry

MIN_BITS, MAX_BITS = 2, 16
EPS = 1e-8  # the smallest range a grid takes (a constant tensor still gets a valid step)

GRIDS: Registry[type["Grid"]] = Registry("quantizer", "a grid is a class registered with @register_grid")


def register_grid(name: str) -> Callable[[type["Grid"]], type["Grid"]]:
    """Class decorator: make a grid available to recipes as `quantizer: <name>`."""
    def add(cls: type[Grid]) -> type[Grid]:
        cls.grid_name = name
        return GRIDS.register(name, cls)
    return add


def get_grid(name: str) -> type["Grid"]:
    return GRIDS.get(name)


def check_bits(bits: int, where: str = "quantizer") -> int:
    """Reject bit widths the integer grid cannot represent, naming the fix."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits={bits!r} for {where} is out of range: use an integer between {MIN_BITS} and {MAX_BITS} "
            f"(e.g. quant.w_bits=8 quant.a_bits=8)"
        )
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


class Grid(nn.Module):
    """Base of every registered quantizer grid."""

    grid_name: ClassVar[str] = "?"
    kinds: ClassVar[frozenset[str] | None] = None  # kinds of point this grid may stand at (None: any)
    observed: ClassVar[bool] = True  # False: a fixed grid that needs no calibration data
    bits: int

    @classmethod
    def from_spec(cls, spec: Any, axis: int | None, channel_axis: int) -> "Grid":
        """Build from a PointSpec; `axis` is the per-channel axis (None: per tensor), `channel_axis` the
        layout's channel axis (needed by grids that are per channel by construction)."""
        raise NotImplementedError

    @classmethod
    def per_tensor(cls, spec: Any, axis: int | None) -> "Grid":
        """`cls(spec.bits)` for a grid with one set of parameters per tensor; a per-channel spec is refused."""
        if axis is not None:
            raise ValueError(f"the {cls.grid_name} quantizer is per tensor: set per_channel: false")
        return cls(spec.bits)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """`from_codes(to_codes(x))` in float32 with a straight-through gradient, for grids without a faster
        forward of their own."""
        if x.dtype != torch.float32:
            return self.fake_quant(x.float()).to(x.dtype)
        deq = self.from_codes(self.to_codes(x.detach()))
        return x + (deq - x).detach() if torch.is_grad_enabled() and x.requires_grad else deq

    def probe(self) -> "Grid":
        """A copy of this grid laid out as [C, N] (per-channel axis 0), for search calibrators."""
        raise NotImplementedError

    def export_params(self) -> dict[str, Any]:
        raise NotImplementedError


@register_grid("uniform")
class UniformQuantizer(Grid):
    """Affine uniform quantizer, per-tensor or per-channel, with straight-through rounding.

    symmetric=True keeps the zero point at 0 (signed grid [-2^(b-1), 2^(b-1)-1] or, with signed=False,
    [0, 2^b-1] for non-negative data such as softmax outputs). symmetric=False fits [min, max] exactly.
    With learnable=True the scale is a parameter trained with the LSQ gradient.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        signed: bool | None = None,
        axis: int | None = None,
        learnable: bool = False,
        zero_in_range: bool = True,
        half_span: bool = False,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        self.zero_in_range = zero_in_range or symmetric  # a symmetric grid is centred on 0
        self.half_span = half_span  # signed symmetric step max|x| / ((2^b - 1) / 2), FQ-ViT's, not / qmax
        self.signed = symmetric if signed is None else signed
        self.axis = axis
        self.learnable = learnable
        if self.signed:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = 0, 2**bits - 1
        scale = torch.ones(1)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(1))

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def extra_repr(self) -> str:
        grid = "signed" if self.signed else "unsigned"
        gran = f"per-channel(axis={self.axis})" if self.per_channel else "per-tensor"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {grid}, {sym}, {gran}" + (", learnable" if self.learnable else "")

    @classmethod
    def from_spec(cls, spec, axis: int | None, channel_axis: int) -> "UniformQuantizer":  # noqa: ANN001
        return cls(spec.bits, spec.symmetric, spec.signed, axis, spec.learnable,
                   getattr(spec, "zero_in_range", True), getattr(spec, "half_span", False))

    def probe(self) -> "UniformQuantizer":
        return UniformQuantizer(self.bits, self.symmetric, self.signed, axis=0 if self.per_channel else None,
                                zero_in_range=self.zero_in_range, half_span=self.half_span)

    def export_params(self) -> dict:
        return {"grid": "uniform", "scale": self.scale.detach().clone(), "zero_point": self.zero_point.detach().clone(),
                "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis}

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set scale and zero point so that [lo, hi] (scalars or per-channel vectors) maps onto the grid."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
        if self.zero_in_range:
            lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
        if self.symmetric:
            if self.signed:
                scale = torch.maximum(-lo, hi) / ((self.qmax - self.qmin) / 2 if self.half_span else self.qmax)
            else:
                scale = hi / self.qmax
            zero_point = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
            scale = scale.clamp_min(EPS)
            zero_point = self.qmin - torch.round(lo / scale)
            if self.zero_in_range:
                zero_point = zero_point.clamp(self.qmin, self.qmax)
        self.set_params(scale.clamp_min(EPS), zero_point)

    @torch.no_grad()
    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        scale = scale.detach().reshape(-1).to(self.scale.device, torch.float32)
        zero_point = zero_point.detach().reshape(-1).to(self.scale.device, torch.float32)
        if self.learnable:
            self.scale = nn.Parameter(scale.clone())
        else:
            self.scale = scale.clone()
        if isinstance(self.zero_point, nn.Parameter):
            self.zero_point = nn.Parameter(zero_point.clone())
        else:
            self.zero_point = zero_point.clone()

    def make_learnable(self, zero_point: bool = False) -> list[nn.Parameter]:
        """Turn the scale (and, on an asymmetric grid with `zero_point`, the zero point) into trainable
        parameters; the forward then takes the LSQ path. Returns the new parameters."""
        if not self.learnable:
            scale = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(scale)
            self.learnable = True
        params = [self.scale]
        if zero_point and not self.symmetric:
            if not isinstance(self.zero_point, nn.Parameter):
                zp = self.zero_point.detach().clone()
                del self.zero_point
                self.zero_point = nn.Parameter(zp)
            params.append(self.zero_point)
        return params

    @torch.no_grad()
    def make_fixed(self) -> None:
        """Back to buffers: the trained scale stays, the zero point is rounded onto the integer grid, and
        the inference path returns."""
        if self.learnable:
            scale = self.scale.detach().clone().clamp_min(EPS)
            del self.scale
            self.register_buffer("scale", scale)
            self.learnable = False
        if isinstance(self.zero_point, nn.Parameter):
            zp = self.zero_point.detach().round()
            zp = zp.clamp(self.qmin, self.qmax) if self.zero_in_range else zp
            del self.zero_point
            self.register_buffer("zero_point", zp)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        """Accept per-channel parameters whose length differs from the placeholder created at init."""
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                self.set_params(
                    state_dict.get(prefix + "scale", self.scale),
                    state_dict.get(prefix + "zero_point", self.zero_point),
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _shape(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel or t.numel() == 1:
            return t
        shape = [1] * x.dim()
        shape[self.axis % x.dim()] = -1
        return t.reshape(shape)

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float tensor) of x on this quantizer's grid."""
        scale, zp = self._shape(self.scale, x), self._shape(self.zero_point, x)
        return torch.clamp(torch.round(x * (1.0 / scale)) + zp, self.qmin, self.qmax)  # as the fused kernels

    def from_codes(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self._shape(self.zero_point, q)) * self._shape(self.scale, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.learnable:
            return self._forward_lsq(x)
        if x.dtype != torch.float32:
            return self.forward(x.float()).to(x.dtype)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self._forward_inference(x)
        if not self.zero_in_range:  # the fused kernels need the zero point among the codes
            return self._forward_ste(x)
        zp = self.zero_point.to(torch.int32)
        if self.per_channel and self.scale.numel() > 1:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, zp, self.axis % x.dim(), self.qmin, self.qmax
            )
        return torch.fake_quantize_per_tensor_affine(x, self.scale, zp, self.qmin, self.qmax)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Same arithmetic as the fused kernels, in place on one buffer: several times faster on CPU,
        where the fused op also materializes the straight-through mask."""
        scale, zp = self._shape(self.scale, x), self._shape(self.zero_point, x)
        y = x * (1.0 / scale)
        return y.round_().add_(zp).clamp_(self.qmin, self.qmax).sub_(zp).mul_(scale)

    def _forward_ste(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernels' arithmetic and gradient (1 where the code is in range, 0 where clipped) for a
        zero point outside the codes."""
        scale, zp = self._shape(self.scale, x), self._shape(self.zero_point, x)
        codes = torch.round(x * (1.0 / scale)) + zp
        inside = (codes >= self.qmin) & (codes <= self.qmax)
        y = (codes.clamp(self.qmin, self.qmax) - zp) * scale
        return torch.where(inside, x + (y - x).detach(), y.detach())

    def _forward_lsq(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ: gradient flows to the scale through the rounding residual (Esser et al., 2020)."""
        scale = self._shape(self.scale, x)
        zp = self._shape(self.zero_point, x)
        n = x.numel() / max(self.scale.numel(), 1)
        grad_scale = 1.0 / (n * self.qmax) ** 0.5 if self.qmax > 0 else 1.0
        scale = (scale - scale * grad_scale).detach() + scale * grad_scale
        if isinstance(self.zero_point, nn.Parameter):  # LSQ+: a learned offset, kept on the integer grid
            zp = round_ste((zp - zp * grad_scale).detach() + zp * grad_scale)
            zp = zp.clamp(self.qmin, self.qmax) if self.zero_in_range else zp
        # the clip decision is taken on the rounded code (as the fused kernels do), so in-range values
        # on the grid ends keep their straight-through gradient; clipped ones pass none to x
        r = round_ste(x / scale + zp)
        inside = (r.detach() >= self.qmin) & (r.detach() <= self.qmax)
        q = torch.where(inside, r, r.detach().clamp(self.qmin, self.qmax))
        return (q - zp) * scale


@register_grid("ptf")
class PTFQuantizer(UniformQuantizer):
    """Power-of-Two Factor (FQ-ViT) for LayerNorm inputs: one layer-wise scale s and zero point, and
    per-channel factors alpha_c in {0..K}; channel c is quantized with scale s * 2^alpha_c.

    The grid is unsigned asymmetric; `scale`/`zero_point` hold the effective per-channel values (so
    the fused per-channel kernel does the work) and `base_scale`/`alpha` the integer-friendly form.
    """

    kinds = frozenset({"norm_input"})

    def __init__(self, bits: int = 8, max_factor: int = 3, axis: int = -1) -> None:
        super().__init__(bits, symmetric=False, signed=False, axis=axis)
        if not 0 <= max_factor <= 8:
            raise ValueError(f"PTF max_factor (K) must be in 0..8, got {max_factor}")
        self.max_factor = max_factor
        self.register_buffer("base_scale", torch.ones(1))
        self.register_buffer("alpha", torch.zeros(1))

    @classmethod
    def from_spec(cls, spec, axis: int | None, channel_axis: int) -> "PTFQuantizer":  # noqa: ANN001
        return cls(spec.bits, spec.max_factor, axis=channel_axis if spec.axis is None else spec.axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, PTF K={self.max_factor}, channel axis={self.axis}"

    def export_params(self) -> dict:
        return {**super().export_params(), "grid": "ptf", "base_scale": self.base_scale.detach().clone(),
                "alpha": self.alpha.detach().clone()}

    @torch.no_grad()
    def base_grid(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s = (max - min) / (2^b - 1) / 2^K and zp = round(-min / (2^K s)), from the layer-wise range."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).min().clamp(max=0)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).max().clamp(min=0)
        coarse = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(EPS)
        zp = torch.round(-lo / coarse).clamp(self.qmin, self.qmax)
        return coarse / 2**self.max_factor, zp

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        """Per-channel factors have one entry per channel, unknown until calibration: take the saved size."""
        key = prefix + "alpha"
        if key in state_dict and state_dict[key].shape != self.alpha.shape:
            self.alpha = torch.zeros_like(state_dict[key], device=self.alpha.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_ptf(self, base_scale: torch.Tensor, zero_point: torch.Tensor, alpha: torch.Tensor) -> None:
        alpha = alpha.reshape(-1).float()
        self.base_scale = base_scale.reshape(1).float().to(self.scale.device)
        self.alpha = alpha.to(self.scale.device)
        self.set_params(self.base_scale * 2**self.alpha, zero_point.reshape(1).expand_as(alpha))


__all__ = ["GRIDS", "Grid", "MAX_BITS", "MIN_BITS", "PTFQuantizer", "UniformQuantizer", "check_bits", "get_grid",
           "register_grid", "round_ste"]
