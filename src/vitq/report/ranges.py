"""Inter-channel variation of LayerNorm inputs (FQ-ViT's motivation for PTF): statistics and a plot."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def layernorm_input_ranges(model: nn.Module, forward_loop: Callable[[nn.Module], None]
                           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel min and max of every LayerNorm's input while `forward_loop(model)` runs."""
    stats: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            def hook(mod, args, name=name):  # noqa: ANN001, ANN202
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                lo, hi = x.amin(0), x.amax(0)
                if name in stats:
                    stats[name] = [torch.minimum(stats[name][0], lo), torch.maximum(stats[name][1], hi)]
                else:
                    stats[name] = [lo, hi]
            handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: (v[0], v[1]) for k, v in stats.items()}


def range_table(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """Per LayerNorm: channel ranges (max - min) and the ratio of the widest to the median channel."""
    rows = []
    for name, (lo, hi) in ranges.items():
        width = hi - lo
        med = float(width.median())
        rows.append({"name": name, "channels": int(width.numel()), "min": float(lo.min()), "max": float(hi.max()),
                     "median_range": med, "max_range": float(width.max()),
                     "max_over_median": float(width.max()) / med if med > 0 else float("inf")})
    return rows


def plot_ranges(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, title: str,
                select: Iterable[str] | None = None):  # noqa: ANN201
    """Per-channel [min, max] bars for a few LayerNorms, and the widest/median ratio for all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranges)
    chosen = list(select) if select else [names[i] for i in sorted({0, len(names) // 2, len(names) - 2})
                                          if 0 <= i < len(names)]
    fig, axes = plt.subplots(1, len(chosen) + 1, figsize=(4.2 * (len(chosen) + 1), 3.4))
    for ax, name in zip(axes, chosen):
        lo, hi = (t.cpu().numpy() for t in ranges[name])
        ch = range(len(lo))
        ax.vlines(ch, lo, hi, linewidth=0.8, color="tab:blue")
        ax.set_title(f"{name} input", fontsize=9)
        ax.set_xlabel("channel")
        ax.set_ylabel("min / max")
    rows = range_table(ranges)
    ax = axes[-1]
    ax.bar(range(len(rows)), [r["max_over_median"] for r in rows], color="tab:orange")
    if max(r["max_over_median"] for r in rows) > 10:
        ax.set_yscale("log")
    ax.set_title("widest / median channel range", fontsize=9)
    ax.set_xlabel("LayerNorm (model order)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
