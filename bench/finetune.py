"""Quantization-aware finetuning on vit_cifar (`python -m bench.run --only finetune`).

Each PTQ model is calibrated once; its `+ finetune` row finetunes that saved model
(`quant.from_checkpoint=<its quantized.ckpt> quant.finetune.epochs=...`) on cifar10-small/train, less the
500 images held out for the validation loop, and is evaluated on cifar10-eval. The finetuning settings
are fixed in advance (below) and never chosen on the evaluation images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from bench.common import FIGURES, OUT, accuracy_rows, cell, load_average

ONLY = ("finetune",)

EPOCHS = 3
SETTINGS = [f"quant.finetune.epochs={EPOCHS}", "quant.finetune.weights=true"]  # lr 1e-4 for steps and weights
RECON_CPU = ["quant.calib.num_samples=256", "quant.calib.batch_size=64", "quant.recon_batch_size=32", "quant.iters=100"]
BASES = {  # label -> (overrides, text), in the order they run (the most asked-for first)
    "minmax-w4a4": (["quant=minmax", "quant.w_bits=4", "quant.a_bits=4"], "MinMax W4A4"),
    "minmax-w3a3": (["quant=minmax", "quant.w_bits=3", "quant.a_bits=3"], "MinMax W3A3"),
    "repq-w4a4": (["quant=repq", "quant.w_bits=4", "quant.a_bits=4"], "RepQ-ViT W4A4"),
    "isvit-w3a3": (["quant=isvit", "quant.w_bits=3", "quant.a_bits=3", *RECON_CPU], "I&S-ViT W3A3"),
}

# a longer budget for the first base: its validation loss (held-out training images) still fell at the end
# of 3 epochs, so the same settings run for more epochs (the evaluation images play no part in this)
LONG = {"minmax-w4a4": 10}


def run_rows(out: Path, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every base and its finetuned row, in pairs (so a stopped section keeps whole comparisons)."""
    rows: list[dict] = []

    def keep(new: list[dict]) -> None:
        if on_row is not None:
            on_row([*rows, *new])

    for label, (overrides, _) in BASES.items():
        base = accuracy_rows("cifar", {label: [*overrides, "quant.scope=matmul"]}, on_row=keep)
        rows += base
        ckpt = out / "cifar" / label / "quantized.ckpt"
        tuned = accuracy_rows("cifar", {f"{label}-ft": [f"quant.from_checkpoint={ckpt}", *SETTINGS]}, on_row=keep)
        rows += tuned
        keep([])
    for label, epochs in LONG.items():
        ckpt = out / "cifar" / label / "quantized.ckpt"
        rows += accuracy_rows("cifar", {f"{label}-ft{epochs}": [f"quant.from_checkpoint={ckpt}", *SETTINGS,
                                                                 f"quant.finetune.epochs={epochs}"]}, on_row=keep)
        keep([])
    return rows


def paired(out: Path, rows: list[dict]) -> list[dict]:
    """Finetuned minus its PTQ model, paired over the same evaluation images (95% bootstrap interval)."""
    from vitq.report.ci import compare_runs

    by = {r["label"]: r for r in rows}
    result = []
    pairs = [(label, f"{label}-ft") for label in BASES] + [(label, f"{label}-ft{e}") for label, e in LONG.items()]
    for label, tuned_label in pairs:
        if label in by and tuned_label in by:
            delta, low, high = compare_runs(out / "cifar" / label, out / "cifar" / tuned_label)
            result.append({"label": tuned_label, "base": label, "delta": delta, "ci": [low, high]})
    return result


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    import torch

    torch.set_num_threads(1)
    figure = FIGURES / "finetune_validation.png"

    def keep(rows: list[dict]) -> None:
        data["finetune"] = {"rows": rows, "paired": paired(OUT, rows), "argv": " ".join(sys.argv[1:]),
                            "load": load_average(),
                            "figure": "figures/finetune_validation.png" if plot_validation(OUT, rows, figure) else None}
        save()

    keep(run_rows(OUT, on_row=keep))


def report(data: dict) -> list[str]:
    """The finetuning table for docs/results.md."""
    block = data.get("finetune") or {}
    rows = block.get("rows") or []
    if not rows:
        return []
    by = {r["label"]: r for r in rows}
    gains = {d["label"]: d for d in block.get("paired", [])}
    r0 = rows[0]
    lines = ["## Quantization-aware finetuning (vit_cifar, scope `matmul`)", "",
             f"`python -m bench.run {block['argv']}` (load average at the end {block['load']}), one intra-op thread. "
             f"Float top-1 {r0['fp_top1']:.2f} % on {r0['eval_samples']} evaluation images (cifar10-eval). Each PTQ "
             f"model is finetuned from its saved checkpoint for {EPOCHS} epochs on cifar10-small/train less the 500 "
             "images held out for the validation loop (9,500 images, batches of 128): LSQ steps, LSQ+ zero points "
             "and the weights, AdamW at 1e-4 with cosine decay, loss = cross-entropy + KL to the float model at "
             "temperature 2; these settings were fixed before any run and not tuned on the evaluation images. "
             f"The {', '.join(f'{k} {v}-epoch' for k, v in LONG.items())} row repeats a base with more epochs "
             "because its validation loss on the held-out images still fell at the end of 3 epochs (the figure). "
             "Training seconds are wall time with another single-thread job on the second core.",
             "", "| model | PTQ top-1 (vs float [95% CI]) | + finetune top-1 (vs float [95% CI]) | finetune - PTQ "
             "[95% CI] | training s | held-out val top-1 |", "|---|---|---|---|---|---|"]
    runs = [(label, f"{label}-ft", text, EPOCHS) for label, (_, text) in BASES.items()]
    runs += [(label, f"{label}-ft{e}", BASES[label][1], e) for label, e in LONG.items()]
    for label, tuned_label, text, epochs in runs:
        base, tuned = by.get(label), by.get(tuned_label)
        if base is None:
            continue
        gain = gains.get(tuned_label)
        lines.append(
            f"| {text}, {epochs} epochs | {cell(base)} | {cell(tuned) if tuned else '–'} | "
            + (f"{gain['delta']:+.2f} [{gain['ci'][0]:+.2f}, {gain['ci'][1]:+.2f}]" if gain else "–") + " | "
            + (f"{tuned['finetune_seconds']:.0f}" if tuned else "–") + " | "
            + (f"{tuned.get('finetune_val_top1', float('nan')):.1f}" if tuned else "–") + " |")
    w4 = [by[t] for label, t, _, _ in runs if label.endswith("w4a4") and t in by]
    if w4:
        best = max(w4, key=lambda r: r["quant_top1"])
        low, high = best["delta_top1_ci"]
        verdict = "within" if best["delta_top1"] >= -1.0 else "not within"
        lines += ["", f"Best finetuned W4A4 model: {best['label']}, {best['delta_top1']:+.2f} [{low:+.2f}, {high:+.2f}] "
                  f"points against float: {verdict} 1 point of float."]
    if block.get("figure"):
        lines += ["", f"![held-out validation during finetuning]({block['figure']})", "",
                  "Validation loss terms per epoch on the 500 held-out training images (KL to the float model, and "
                  "cross-entropy), from each run's `csv/metrics.csv`."]
    return lines + [""]


def plot_validation(out: Path, rows: list[dict], path: Path) -> bool:
    """KL to the float model and cross-entropy on the held-out images after each epoch, per finetuned run."""
    import csv

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for row in rows:
        log = out / "cifar" / row["label"] / "csv" / "metrics.csv"
        if "finetune_epochs" not in row or not log.is_file():
            continue
        points = [(int(r["epoch"]), float(r["val/kd"]), float(r["val/task"]))
                  for r in csv.DictReader(log.open()) if r.get("val/kd")]
        if points:
            curves[row["label"]] = points
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, points in curves.items():
        epochs = [p[0] + 1 for p in points]
        axes[0].plot(epochs, [p[1] for p in points], marker="o", label=label)
        axes[1].plot(epochs, [p[2] for p in points], marker="o", label=label)
    axes[0].set(title="KL to the float model (val/kd)", xlabel="epoch", yscale="log")
    axes[1].set(title="cross-entropy (val/task)", xlabel="epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    fig.suptitle("vit_cifar finetuning: 500 held-out training images")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def readme(data: dict) -> str:
    """One README sentence: each PTQ model and its finetuned top-1 on vit_cifar."""
    block = data.get("finetune") or {}
    by = {r["label"]: r for r in block.get("rows") or []}
    cells = [f"{text} {by[label]['quant_top1']:.2f} -> {by[label + '-ft']['quant_top1']:.2f}"
             for label, (_, text) in BASES.items() if label in by and f"{label}-ft" in by]
    if not cells:
        return ""
    fp = next(iter(by.values()))["fp_top1"]
    longer = [f"a {e}-epoch row" for label, e in LONG.items() if f"{label}-ft{e}" in by]
    return (f"\nQuantization-aware finetuning on vit_cifar ({EPOCHS} epochs, top-1 %, float {fp:.2f}): " + ", ".join(cells)
            + f"; intervals{', training time and ' + ', '.join(longer) if longer else ' and training time'} in "
            "docs/results.md.\n")
