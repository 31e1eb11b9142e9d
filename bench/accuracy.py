"""Methods x bit widths on the small models, every delta with its 95% interval (`--only accuracy`)."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from bench.common import BITS, MODELS, accuracy_rows, bits_header, cell, merge_rows

ONLY = ("accuracy",)
METHODS = ["minmax", "percentile", "omse", "repq"]


def method_recipes() -> dict[str, list[str]]:
    return {f"{m}-w{w}a{a}": [f"quant={m}", f"quant.w_bits={w}", f"quant.a_bits={a}", "quant.scope=matmul"]
            for m in METHODS for w, a in BITS}


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    accuracy = data.setdefault("accuracy", {})
    for key in args.models.split(","):
        accuracy[key] = merge_rows(accuracy.get(key, []), accuracy_rows(key, method_recipes()))
        save()


def float_training_info(model_key: str) -> dict:
    from vitq.engine.float_model import cache_dir

    model, task, _ = MODELS[model_key]
    files = sorted(cache_dir(None).glob(f"{model}-{task}-*.pt"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    ckpt = torch.load(files[-1], map_location="cpu", weights_only=False)
    return {"train_seconds": ckpt.get("train_seconds"), "epochs": ckpt.get("fit", {}).get("epochs")}


def _method_table(rows: list[dict]) -> list[str]:
    by = {r["label"]: r for r in rows}
    lines = bits_header(BITS, "method")
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(cell(by.get(f"{m}-w{w}a{a}")) for w, a in BITS) + " |")
    return lines


def report(data: dict) -> list[str]:
    lines: list[str] = []
    for key, rows in data.get("accuracy", {}).items():
        methods = [r for r in rows if not r["label"].startswith(("fqvit", "recon-"))]
        if not methods:
            continue
        info = float_training_info(key)
        model, task, _ = MODELS[key]
        r0 = methods[0]
        lines += [f"## {model} on {task}", "",
                  f"Float top-1 {r0['fp_top1']:.2f} %, top-5 {r0['fp_top5']:.2f} % on {r0['eval_samples']} evaluation "
                  f"images" + (f"; trained here in {info['train_seconds']:.0f} s ({info['epochs']} epochs, cached)"
                               if info.get("train_seconds") else "") + ".", "",
                  "Scope `matmul` (inputs and weights of every linear layer and both attention matmuls). Quantized "
                  "top-1 % (delta [95% CI]). minmax / percentile / omse: per-channel symmetric MinMax weights, "
                  "per-tensor asymmetric activations with that calibrator, 256 calibration images. repq: RepQ-ViT "
                  "(per-channel post-LayerNorm calibration folded into per-tensor scales, log-sqrt2 attention, "
                  "quantile-searched clips, asymmetric per-row weights, 8-bit image input), 32 calibration images.",
                  "", *_method_table(methods), ""]
    return lines


def readme(data: dict) -> str:
    """The README's headline table; the full tables are in docs/results.md."""
    lines = ["| model | float | MinMax W4A4 | OMSE W4A4 | RepQ-ViT W4A4 | RepQ-ViT W6A6 | FQ-ViT 8/8/4 (full) |",
             "|---|---|---|---|---|---|---|"]
    for key, rows in data.get("accuracy", {}).items():
        by = {r["label"]: r for r in rows}
        if not rows:
            continue
        cells = [f"{rows[0]['fp_top1']:.2f}"] + [
            f"{by[label]['quant_top1']:.2f} ({by[label]['delta_top1']:+.2f} ± "
            f"{(by[label]['delta_top1_ci'][1] - by[label]['delta_top1_ci'][0]) / 2:.2f})" if label in by else "–"
            for label in ("minmax-w4a4", "omse-w4a4", "repq-w4a4", "repq-w6a6", "fqvit-ptf-lis-884-minmax")]
        lines.append(f"| {MODELS[key][0]} ({MODELS[key][1]}, {rows[0]['eval_samples']} images) | " + " | ".join(cells) + " |")
    return ("Top-1 % (delta vs float ± half its 95% interval), `make bench`; details, the FQ-ViT ablation, DeiT-S "
            "fidelity beside the published RepQ-ViT / FQ-ViT code, and speed in [docs/results.md](docs/results.md):"
            "\n\n" + "\n".join(lines) + "\n")
