"""Block reconstruction on vit_cifar: QDrop, I&S-ViT and its ablation (`--only reconstruct`)."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from bench.common import accuracy_rows, bits_header, cell, invocations, rows_to_refresh

ONLY = ("reconstruct",)
# CPU scale: 256 calibration images (= the reconstruction set), mini-batches of 32, 100 iterations per
# unit and pass (20 at W6A6: the paper's 1000/200 ratio).
RECON_BITS = [(3, 3), (4, 4), (6, 6)]
RECON_CPU = ["quant.calib.num_samples=256", "quant.calib.batch_size=64", "quant.recon_batch_size=32"]
RECON_METHODS = {  # label -> (overrides, text); the ablation rows are I&S-ViT with SULQ / SOS switched off
    "minmax": (["quant=minmax"], "MinMax (256 images)"),
    "repq": (["quant=repq"], "RepQ-ViT (32 images)"),
    "qdrop": (["quant=qdrop", *RECON_CPU], "QDrop"),
    "isvit": (["quant=isvit", *RECON_CPU], "I&S-ViT (SULQ + SOS)"),
    "isvit-neither": (["quant=isvit", "quant.sulq=false", "quant.sos=false", *RECON_CPU], "ablation: neither"),
    "isvit-sulq": (["quant=isvit", "quant.sos=false", *RECON_CPU], "ablation: SULQ only"),
    "isvit-sos": (["quant=isvit", "quant.sulq=false", *RECON_CPU], "ablation: SOS only"),
}


def recon_recipes() -> dict[str, list[str]]:
    """Every reconstruction row: the four methods at W3A3 and W4A4 first (where they differ most), then the
    W3A3 ablation, the methods at W6A6, and the remaining ablation rows."""
    main = ["minmax", "repq", "isvit", "qdrop"]
    ablation = [m for m in RECON_METHODS if m not in main]
    order = [(m, 3) for m in main] + [(m, 4) for m in main] + [(m, 3) for m in ablation] + [(m, 6) for m in main] \
        + [(m, 4) for m in ablation] + [(m, 6) for m in ablation]
    rows = {}
    for m, bits in order:
        overrides = RECON_METHODS[m][0]
        iters = 20 if bits >= 6 else 100
        extra = [f"quant.iters={iters}"] if any(o in overrides for o in ("quant=isvit", "quant=qdrop")) else []
        rows[f"recon-{m}-w{bits}a{bits}"] = [*overrides, f"quant.w_bits={bits}", f"quant.a_bits={bits}",
                                             "quant.scope=matmul", *extra]
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recon-rows", default=None,
                        help="reconstruct: measure again only the rows whose label holds one of these comma-separated "
                             "words (e.g. qdrop after a change to its defaults), keeping the others")


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    torch.set_num_threads(1)  # a shared 2-core machine: one thread, every row in this one process
    old = data.get("reconstruct", [])
    recipes = rows_to_refresh(data, "reconstruct", "--recon-rows", getattr(args, "recon_rows", None),
                              recon_recipes(), old)
    if "reconstruct_refreshed" not in data:
        old = []

    def keep(rows: list[dict]) -> None:
        fresh = {r["label"]: r for r in rows}
        data["reconstruct"] = [fresh.pop(r["label"], r) for r in old] + list(fresh.values())
        save()

    keep(accuracy_rows("cifar", recipes, on_row=keep))


def report(data: dict) -> list[str]:
    """The reconstruction table (methods x bits with intervals) and the per-unit cost of each run."""
    rows = data.get("reconstruct", [])
    if not rows:
        return []
    by = {r["label"]: r for r in rows}
    r0 = rows[0]
    lines = ["## Block reconstruction: QDrop, I&S-ViT and its ablation (vit_cifar, scope `matmul`)", "",
             f"Float top-1 {r0['fp_top1']:.2f} % on {r0['eval_samples']} evaluation images (cifar10-eval); "
             f"{invocations(data, 'reconstruct', '--recon-rows', '--only reconstruct')}, one intra-op thread. "
             "Quantized top-1 % (delta [95% CI]). CPU scale: QDrop and I&S-ViT calibrate and reconstruct on 256 "
             "images of cifar10-small/train (the paper: 1024), mini-batches of 32 (the paper: 64; QDrop 32), 100 "
             "iterations per unit and pass at W3A3/W4A4 and 20 at W6A6 (the paper: 1000/200; QDrop 20000); every "
             "other setting as the method's protocol card in docs/methods.md, which names where it departs from "
             "the published code. Ablation rows are I&S-ViT with `quant.sulq=false` (uniform "
             "attention probabilities) and/or `quant.sos=false` (post-LayerNorm inputs per tensor, stage 3 alone).",
             "", *bits_header(RECON_BITS, "method")]
    for m, (_, text) in RECON_METHODS.items():
        lines.append(f"| {text} | " + " | ".join(cell(by.get(f"recon-{m}-w{w}a{a}")) for w, a in RECON_BITS) + " |")
    lines += ["", "Against the paper's expectations (I&S-ViT >= RepQ-ViT >= MinMax at W4A4 and W3A3; I&S-ViT at W3A3 "
              "at least 20 points above MinMax), computed from the rows above:", ""]
    for w, a in RECON_BITS[:2]:
        mm, rq, isv = (by.get(f"recon-{m}-w{w}a{a}") for m in ("minmax", "repq", "isvit"))
        if mm and rq and isv:
            holds = isv["quant_top1"] >= rq["quant_top1"] >= mm["quant_top1"]
            lines.append(f"- W{w}A{a}: I&S-ViT {isv['quant_top1']:.2f}, RepQ-ViT {rq['quant_top1']:.2f}, MinMax "
                         f"{mm['quant_top1']:.2f}: the order {'holds' if holds else 'does not hold'}; I&S-ViT - MinMax "
                         f"= {isv['quant_top1'] - mm['quant_top1']:+.2f} points (MinMax is {-mm['delta_top1']:.2f} "
                         "points below float, the most any method can gain over it).")
    return lines + _cost(rows) + [""]


def _cost(rows: list[dict]) -> list[str]:
    lines = ["", "Reconstruction cost per run (wall seconds of the stage; per unit: mean seconds, largest cache, "
             "peak resident memory of the process during the unit):", "",
             "| run | passes x units | stage s | unit s (mean / max) | cache MiB (max) | peak MiB (max) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        units = r.get("reconstruct_units") or []
        if not units:
            continue
        secs = [u["seconds"] for u in units]
        lines.append(f"| {r['label']} | {r['reconstruct_passes']} x {len(units) // max(r['reconstruct_passes'], 1)} | "
                     f"{r['reconstruct_seconds']:.0f} | {sum(secs) / len(secs):.1f} / {max(secs):.1f} | "
                     f"{max(u['cache_mib'] for u in units):.1f} | {max(u['peak_mib'] for u in units):.0f} |")
    detail = next((r for r in rows if r["label"] == "recon-isvit-w3a3"), None)
    if detail is not None:
        lines += ["", f"Per unit, {detail['label']} (error = squared error per token against the float unit on the "
                  "cached calibration inputs, before -> after):", "",
                  "| pass | unit | seconds | cache MiB | peak MiB | error before | error after |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {u['pass']} | {u['name']} | {u['seconds']:.1f} | {u['cache_mib']:.1f} | {u['peak_mib']:.0f} | "
                  f"{u['loss_before']:.4g} | {u['loss_after']:.4g} |" for u in detail["reconstruct_units"]]
    return lines
