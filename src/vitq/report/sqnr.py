"""Signal-to-quantization-noise ratio of a quantized model's outputs against the float model's."""
from __future__ import annotations

from typing import Callable, Iterable

import math

import torch
from torch import nn


def sqnr_from_sums(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB: +inf when the outputs are equal, -inf for a zero reference."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class SQNRMeter:
    """Signal and noise energy summed over all batches (float64), so the SQNR is the pooled one, not a
    mean of per-batch dBs (one batch that happens to match exactly would make that +inf)."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: torch.Tensor, output: torch.Tensor) -> None:
        ref, out = reference.double(), output.to(reference.device).double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((out - ref).pow(2).sum())

    @property
    def db(self) -> float:
        return sqnr_from_sums(self.signal, self.noise)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |test - ref|^2) over all elements (inf when they are equal)."""
    meter = SQNRMeter()
    meter.add(reference, test)
    return meter.db


def _as_list(out: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


@torch.no_grad()
def output_sqnr(fp_model: nn.Module, q_model: nn.Module, batches: Iterable[torch.Tensor],
                forward: Callable[[nn.Module, torch.Tensor], torch.Tensor | Iterable[torch.Tensor]] | None = None
                ) -> list[float]:
    """SQNR (dB) of each output (e.g. each feature level of a backbone), pooled over the batches."""
    forward = forward or (lambda m, x: m(x))
    meters: list[SQNRMeter] = []
    for x in batches:
        for i, (f, q) in enumerate(zip(_as_list(forward(fp_model, x)), _as_list(forward(q_model, x)))):
            if len(meters) <= i:
                meters.append(SQNRMeter())
            meters[i].add(f, q)
    return [m.db for m in meters]
