"""Quantization-aware finetuning on vit_cifar (`python -m bench.run --only finetune`).

Each PTQ model is calibrated once; its `+ finetune` row finetunes that saved model
(`quant.from_checkpoint=<its quantized.ckpt> quant.finetune.epochs=...`) on cifar10-small/train, less the
500 images held out for the validation loop, and is evaluated on cifar10-eval. The finetuning settings
are fixed in advance (below) and never chosen on the evaluation images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

EPOCHS = 3
SETTINGS = [f"quant.finetune.epochs={EPOCHS}", "quant.finetune.weights=true"]  # lr 1e-4 for steps and weights
RECON_CPU = ["quant.calib.num_samples=256", "quant.calib.batch_size=64", "quant.recon_batch_size=32", "quant.iters=100"]
BASES = {  # label -> (overrides, text), in the order they run (the most asked-for first)
    "minmax-w4a4": (["quant=minmax", "quant.w_bits=4", "quant.a_bits=4"], "MinMax W4A4"),
    "minmax-w3a3": (["quant=minmax", "quant.w_bits=3", "quant.a_bits=3"], "MinMax W3A3"),
    "repq-w4a4": (["quant=repq", "quant.w_bits=4", "quant.a_bits=4"], "RepQ-ViT W4A4"),
    "isvit-w3a3": (["quant=isvit", "quant.w_bits=3", "quant.a_bits=3", *RECON_CPU], "I&S-ViT W3A3"),
}


def run_rows(accuracy_rows: Callable, out: Path, on_row: Callable | None = None) -> list[dict]:
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
    return rows


def paired(out: Path, rows: list[dict]) -> list[dict]:
    """Finetuned minus its PTQ model, paired over the same evaluation images (95% bootstrap interval)."""
    from vitq.report.ci import paired_bootstrap

    by = {r["label"]: r for r in rows}
    result = []
    for label in BASES:
        if label in by and f"{label}-ft" in by:
            base = torch.load(out / "cifar" / label / "outcomes.pt")["top1"]
            tuned = torch.load(out / "cifar" / f"{label}-ft" / "outcomes.pt")["top1"]
            delta, low, high = paired_bootstrap(base, tuned)
            result.append({"label": label, "delta": delta, "ci": [low, high]})
    return result


def _cell(row: dict) -> str:
    low, high = row["delta_top1_ci"]
    return f"{row['quant_top1']:.2f} ({row['delta_top1']:+.2f} [{low:+.2f}, {high:+.2f}])"


def section(block: dict) -> list[str]:
    """The finetuning table for docs/results.md."""
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
             "temperature 2; these settings were fixed before any run and not tuned on the evaluation images.",
             "", "| model | PTQ top-1 (vs float [95% CI]) | + finetune top-1 (vs float [95% CI]) | finetune - PTQ "
             "[95% CI] | training s | held-out val top-1 |", "|---|---|---|---|---|---|"]
    for label, (_, text) in BASES.items():
        base, tuned = by.get(label), by.get(f"{label}-ft")
        if base is None:
            continue
        gain = gains.get(label)
        lines.append(
            f"| {text} | {_cell(base)} | {_cell(tuned) if tuned else '–'} | "
            + (f"{gain['delta']:+.2f} [{gain['ci'][0]:+.2f}, {gain['ci'][1]:+.2f}]" if gain else "–") + " | "
            + (f"{tuned['finetune_seconds']:.0f}" if tuned else "–") + " | "
            + (f"{tuned.get('finetune_val_top1', float('nan')):.1f}" if tuned else "–") + " |")
    return lines + [""]
