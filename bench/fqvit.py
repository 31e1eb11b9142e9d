"""The FQ-ViT ablation on the small models, scope `full` (`--only fqvit`); rows kept with the accuracy rows."""
from __future__ import annotations

import argparse
import shutil
from typing import Callable

from bench.common import FIGURES, MODELS, OUT, accuracy_rows, cell, merge_rows

ONLY = ("fqvit",)
FQVIT = {  # label -> (overrides, text)
    "fqvit-minmax-888": (["quant=fqvit", "quant.ptf=false", "quant.lis=false", "quant.attn_bits=8"], "MinMax 8/8/8"),
    "fqvit-ptf-888": (["quant=fqvit", "quant.lis=false", "quant.attn_bits=8"], "MinMax + PTF 8/8/8"),
    "fqvit-ptf-lis-884-minmax": (["quant=fqvit"], "MinMax + PTF + LIS 8/8/4 (FQ-ViT)"),
    "fqvit-ptf-lis-884-ema": (["quant=fqvit", "quant.observer=ema"], "EMA + PTF + LIS 8/8/4"),
    "fqvit-ptf-lis-884-percentile": (["quant=fqvit", "quant.observer=percentile"], "Percentile + PTF + LIS 8/8/4"),
    "fqvit-ptf-lis-884-omse": (["quant=fqvit", "quant.observer=omse"], "OMSE + PTF + LIS 8/8/4"),
    "fqvit-ptf-lis-884-minmax-integer": (["quant=fqvit", "quant.integer=exact"],
                                         "MinMax + PTF + LIS 8/8/4, vitq's exact integer LayerNorm/softmax"),
    "fqvit-ptf-lis-884-minmax-float-ln": (["quant=fqvit", "quant.integer=false"],
                                          "MinMax + PTF + LIS 8/8/4, float LayerNorm/softmax (former default)"),
}


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    accuracy = data.setdefault("accuracy", {})
    for key in args.models.split(","):
        rows = accuracy_rows(key, {label: overrides for label, (overrides, _) in FQVIT.items()})
        accuracy[key] = merge_rows(accuracy.get(key, []), rows)
        save()
        src = OUT / key / "fqvit-ptf-lis-884-minmax" / "layernorm_ranges.png"
        if src.exists():
            FIGURES.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, FIGURES / f"layernorm_ranges_{MODELS[key][0]}.png")


def report(data: dict) -> list[str]:
    fq = {k: {r["label"]: r for r in rows if r["label"].startswith("fqvit")} for k, rows in data.get("accuracy", {}).items()}
    keys = [k for k in fq if fq[k]]
    if not keys:
        return []
    lines = ["## FQ-ViT ablation (scope `full`)", "",
             "Top-1 % (delta [95% CI]); W/A/attention bits; 1000 calibration images in batches of 100, as the "
             "paper. Scope `full` also quantizes LayerNorm inputs (the residual stream), layer outputs and "
             "attention scores, so these rows are not comparable with the `matmul` tables above.", "",
             "| method | " + " | ".join(MODELS[k][0] for k in keys) + " |", "|---|" + "---|" * len(keys),
             "| float | " + " | ".join(f"{next(iter(fq[k].values()))['fp_top1']:.2f}" for k in keys) + " |"]
    for label, (_, text) in FQVIT.items():
        lines.append(f"| {text} | " + " | ".join(cell(fq[k].get(label)) for k in keys) + " |")
    lines.append("")
    for k in keys:
        fig = FIGURES / f"layernorm_ranges_{MODELS[k][0]}.png"
        if fig.exists():
            lines += [f"![LayerNorm input ranges, {MODELS[k][0]}](figures/{fig.name})", ""]
    return lines
