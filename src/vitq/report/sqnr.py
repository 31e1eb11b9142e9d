"""Signal-to-quantization-noise ratio of a quantized model's outputs against the float model's."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |test - ref|^2) over all elements (inf when they are equal)."""
    ref, noise = reference.double(), test.double() - reference.double()
    signal, err = float(ref.pow(2).sum()), float(noise.pow(2).sum())
    return float("inf") if err == 0 else 10.0 * torch.log10(torch.tensor(signal / err)).item()


def _as_list(out: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


@torch.no_grad()
def output_sqnr(fp_model: nn.Module, q_model: nn.Module, batches: Iterable[torch.Tensor],
                forward: Callable[[nn.Module, torch.Tensor], torch.Tensor | Iterable[torch.Tensor]] | None = None
                ) -> list[float]:
    """SQNR (dB) of each output (e.g. each feature level of a backbone), pooled over the batches."""
    forward = forward or (lambda m, x: m(x))
    signal: list[float] = []
    noise: list[float] = []
    for x in batches:
        for i, (f, q) in enumerate(zip(_as_list(forward(fp_model, x)), _as_list(forward(q_model, x)))):
            if len(signal) <= i:
                signal.append(0.0)
                noise.append(0.0)
            signal[i] += float(f.double().pow(2).sum())
            noise[i] += float((q.double() - f.double()).pow(2).sum())
    return [float("inf") if n == 0 else 10.0 * float(torch.log10(torch.tensor(s / n))) for s, n in zip(signal, noise)]
