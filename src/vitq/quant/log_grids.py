"""The log-domain grids for attention probabilities: FQ-ViT's log2 (fixed, no calibration), RepQ-ViT's
log-sqrt2 (a calibrated scale) and AdaLog's adaptive base."""
from __future__ import annotations

import torch

from .quantizers import EPS, Grid, check_bits, register_grid


def log_round(n: torch.Tensor) -> torch.Tensor:
    """FQ-ViT's log round of n >= 1: k = floor(log2 n), plus one when n >= 1.5 * 2^k (float tensors;
    exact, through frexp: n = m 2^e with m in [0.5, 1))."""
    mantissa, exponent = torch.frexp(n)
    return (exponent - 1 + (mantissa >= 0.75).to(exponent.dtype)).to(n.dtype)


@register_grid("log2")
class Log2Quantizer(Grid):
    """Log2 quantizer for attention probabilities (FQ-ViT's LIS): x -> 2^-q with q in [0, 2^b - 1];
    codes beyond the grid dequantize to 0.

    As FQ-ViT defines it, 1/x is first rounded to an integer n, then q = log_round(n) (floor(log2 n),
    plus one when n >= 1.5 * 2^floor(log2 n)). The integer softmax computes the same n as the rounded
    integer ratio row-sum / exp, so the simulation here is the float twin of the integer kernel.
    """

    kinds = frozenset({"softmax_output"})
    observed = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.qmax = 2**bits - 1

    @classmethod
    def from_spec(cls, spec, axis: int | None, channel_axis: int) -> "Log2Quantizer":  # noqa: ANN001
        return cls(spec.bits)

    def probe(self) -> "Log2Quantizer":
        return Log2Quantizer(self.bits)

    def export_params(self) -> dict:
        return {"grid": "log2", "bits": self.bits, "qmax": self.qmax}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log2"

    def codes_from_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        """Codes for 1/x given directly: the ratio is rounded to an integer first (half to even)."""
        n = torch.round(ratio)
        q = log_round(n.clamp_min(1.0))
        return torch.where(torch.isfinite(n), q, torch.full_like(q, self.qmax + 1)).clamp(0, self.qmax + 1)

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes 0..2^b-1, or 2^b for values that dequantize to zero."""
        return self.codes_from_ratio(1.0 / x)

    def from_codes(self, q: torch.Tensor) -> torch.Tensor:
        return torch.where(q > self.qmax, torch.zeros_like(q), torch.exp2(-q))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            deq = self.from_codes(self.to_codes(x.detach()))
            return x + (deq - x).detach()  # straight-through
        # inference: the same codes with fewer passes over the attention tensor
        n = torch.reciprocal(x).round_()
        mantissa, exponent = torch.frexp(n)
        code = exponent.sub_(1).add_(mantissa >= 0.75).clamp_(0, self.qmax)
        out = torch.exp2(code.neg_().to(x.dtype))
        return out.masked_fill_(x <= self.zero_below, 0.0)

    @property
    def zero_below(self) -> float:
        """x at or below this dequantizes to 0: round(1/x) >= 1.5 * 2^qmax gives a code beyond the grid,
        i.e. 1/x >= 1.5 * 2^qmax - 0.5 (a tie rounds to the even integer 1.5 * 2^qmax for qmax >= 1)."""
        return max(1.0 / (1.5 * 2.0**self.qmax - 0.5), 2.0**-128)  # below 2^-128, 1/x overflows float32


class ScaledLogGrid(Grid):
    """A log grid for attention probabilities with one calibrated scale D (its levels are D times powers of
    a base): `set_range(lo, hi)` takes D = hi, so a search over candidate clips scores the grid directly."""

    kinds = frozenset({"softmax_output"})

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.qmax = 2**bits - 1
        self.register_buffer("scale", torch.ones(1))

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).max()
        self.scale = hi.clamp_min(EPS).reshape(1).to(self.scale.device)


@register_grid("log_sqrt2")
class LogSqrt2Quantizer(ScaledLogGrid):
    """Base-sqrt(2) log quantizer for attention probabilities (RepQ-ViT): q = clamp(round(-2 log2(x/D)),
    0, 2^b - 1), dequantized as D 2^(-q/2); raw codes at or beyond 2^b dequantize to 0.

    D (`scale`) comes from a calibrator (a quantile search over candidate clips, through `set_range`).
    """

    @classmethod
    def from_spec(cls, spec, axis: int | None, channel_axis: int) -> "LogSqrt2Quantizer":  # noqa: ANN001
        return cls.per_tensor(spec, axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log-sqrt2"

    def probe(self) -> "LogSqrt2Quantizer":
        return LogSqrt2Quantizer(self.bits)

    def export_params(self) -> dict:
        return {"grid": "log_sqrt2", "bits": self.bits, "scale": self.scale.detach().clone()}

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes 0..2^b-1, or 2^b for values that dequantize to zero (x <= 0 included)."""
        raw = torch.round(-2.0 * torch.log2(x / self.scale))
        raw = torch.nan_to_num(raw, nan=float(self.qmax + 1), posinf=float(self.qmax + 1))
        return torch.where(raw > self.qmax, torch.full_like(raw, self.qmax + 1), raw.clamp_min(0))

    def from_codes(self, q: torch.Tensor) -> torch.Tensor:
        return torch.where(q > self.qmax, torch.zeros_like(q), self.scale * torch.exp2(-0.5 * q))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return self.forward(x.float()).to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            deq = self.from_codes(self.to_codes(x.detach()))
            return x + (deq - x).detach()  # straight-through
        # inference: the same arithmetic in place on one buffer (the attention tensor is the largest)
        y = torch.div(x, self.scale).log2_().mul_(-2.0).round_()
        beyond = ~(y <= self.qmax)  # codes past the grid, and x <= 0 (log2 gives -inf or NaN)
        return y.clamp_(min=0).mul_(-0.5).exp2_().mul_(self.scale).masked_fill_(beyond, 0.0)


@register_grid("adalog")
class AdaLogQuantizer(ScaledLogGrid):
    """AdaLog's adaptive-base log grid (Wu et al., ECCV 2024; GoatWu/AdaLog `quantizers/logarithm.py`): base
    2^(q/r) with r = 37 fixed and an integer q (37: plain log2), codes k = round(-log2(x/s) r/q) in 0..2^b-1
    (x/s clamped to [1e-15, 1] first, as the code). Dequantized in the code's hardware form
    s 2^-floor(kq/r) LUT[(kq) mod r], LUT[j] = round(2^(-j/r) D) / D with D = 2^(b+1) - 2, so a level is a
    shift of a (b+1)-bit table entry; a code that would reach 2^b dequantizes to 0. `q` and `s` are set by
    the method's search (`set_base`, `set_range`)."""

    observed = False
    R = 37

    def __init__(self, bits: int = 4, q: int = 37) -> None:
        super().__init__(bits)
        self.register_buffer("q", torch.tensor([float(q)]))
        # LUT[j] = round(2^(-j/r) D) / D for the residues j = 0..r-1, D = 2^(b+1) - 2: fixed by the bits
        d = 2.0 ** (self.bits + 1) - 2
        j = torch.arange(self.R, dtype=torch.float64)
        self.register_buffer("table", (torch.round(torch.exp2(-j / self.R) * d) / d).float(), persistent=False)

    @classmethod
    def from_spec(cls, spec, axis: int | None, channel_axis: int) -> "AdaLogQuantizer":  # noqa: ANN001
        return cls.per_tensor(spec, axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, adalog base 2^({int(self.q)}/{self.R})"

    def probe(self) -> "AdaLogQuantizer":
        return AdaLogQuantizer(self.bits, int(self.q))

    def export_params(self) -> dict:
        return {"grid": "adalog", "bits": self.bits, "scale": self.scale.detach().clone(), "q": int(self.q),
                "r": self.R}

    @torch.no_grad()
    def set_base(self, q: int) -> None:
        """The base 2^(q/37), q an integer (the code searches 10..137)."""
        if int(q) != q or q < 1:
            raise ValueError(f"AdaLog's q must be a positive integer (base 2^(q/37)), got {q!r}")
        self.q.fill_(float(q))

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes 0..2^b-1, or 2^b for values that dequantize to zero."""
        ratio = (x / self.scale).clamp(min=1e-15, max=1.0)
        raw = torch.round(-torch.log2(ratio) * self.R / self.q)
        return torch.where(raw > self.qmax, torch.full_like(raw, self.qmax + 1), raw)

    def from_codes(self, k: torch.Tensor) -> torch.Tensor:
        kq = (k.clamp(0, self.qmax) * self.q).round()  # integers
        shift, residue = torch.div(kq, self.R, rounding_mode="floor"), torch.remainder(kq, self.R)
        level = torch.exp2(-shift) * self.table[residue.long()] * self.scale
        return torch.where(k > self.qmax, torch.zeros_like(level), level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x)


__all__ = ["AdaLogQuantizer", "Log2Quantizer", "LogSqrt2Quantizer", "ScaledLogGrid", "log_round"]
