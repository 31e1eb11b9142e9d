"""The finetuning curves of one run, as a figure people look at rather than read (from its CSV log)."""
from __future__ import annotations

from pathlib import Path


def _series(rows: list[dict[str, str]], key: str, by: str) -> list[tuple[float, float]]:
    return [(float(r[by]), float(r[key])) for r in rows if r.get(key) and r.get(by)]


def plot_finetune_curves(rows: list[dict[str, str]], path: Path, title: str) -> bool:
    """Training loss per logged step and validation loss per epoch (`train/loss`, `val/loss` of the finetune
    stage) from CSV log rows (a requeued run's earlier attempts first); False, and no file, when they hold
    neither."""
    train, val = _series(rows, "train/loss", "step"), _series(rows, "val/loss", "epoch")
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        axes[0].plot(*zip(*train), marker=".", lw=1)
    axes[0].set(title="training loss (train/loss)", xlabel="step")
    if val:
        axes[1].plot([e + 1 for e, _ in val], [v for _, v in val], marker="o")
    axes[1].set(title="held-out validation loss (val/loss)", xlabel="epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
