"""Paired bootstrap confidence intervals for metric differences over evaluation samples."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def paired_bootstrap(fp: torch.Tensor, quant: torch.Tensor, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, scale: float = 100.0) -> tuple[float, float, float]:
    """(delta, low, high) of mean(quant) - mean(fp), x `scale`, resampling samples with replacement.

    The same resampled indices serve both models (the comparison is paired), so the interval reflects
    how many samples changed outcome, not the spread of the metric itself. Fixed seed: reproducible.
    """
    fp, quant = fp.reshape(-1).double(), quant.reshape(-1).double()
    if fp.shape != quant.shape or fp.numel() == 0:
        raise ValueError(f"paired samples must have the same non-zero length, got {fp.numel()} and {quant.numel()}")
    diff = quant - fp
    n = diff.numel()
    g = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, 100):  # bounded memory: 100 resamples of n indices at a time
        idx = torch.randint(n, (min(100, resamples - start), n), generator=g)
        means.append(diff[idx].mean(dim=1))
    means = torch.cat(means) * scale
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype)).tolist()
    return float(diff.mean() * scale), low, high


def compare_runs(base_dir: "str | os.PathLike", other_dir: "str | os.PathLike", metric: str = "top1"
                 ) -> tuple[float, float, float]:
    """(delta, low, high) of `metric` between two finished runs on the same evaluation samples, other minus
    base, from the per-sample outcomes each run wrote (`<run>/outcomes.pt`)."""
    base = torch.load(Path(base_dir) / "outcomes.pt")[metric]
    other = torch.load(Path(other_dir) / "outcomes.pt")[metric]
    return paired_bootstrap(base, other)
