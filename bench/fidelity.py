"""Fidelity on DeiT-S (random weights, seed 0) against the float model, on the protocol used to run the
published RepQ-ViT and FQ-ViT code side by side: 32 calibration and 256 evaluation CIFAR-10 images at
224 (timm's evaluation transform for deit_small; class-interleaved first N of cifar10-small train/val).

Metrics of a quantized model against float: top-1 agreement (% of images whose argmax is the float
model's), mean per-image logit cosine, SQNR over all logits, calibration wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import ROOT, shared

ONLY = ("fidelity",)
ARCH = "deit_small_patch16_224"
CALIB, EVAL, BATCH = 32, 256, 64
PEER = ROOT / "bench" / "peer_measurements.json"
FIDELITY = {  # label -> (recipe name, overrides)
    "vitq minmax W4A4": ("minmax", {"w_bits": 4, "a_bits": 4}),
    "vitq repq W4A4": ("repq", {}),
    "vitq repq W6A6": ("repq", {"w_bits": 6, "a_bits": 6}),
    "vitq fqvit 8/8/4": ("fqvit", {}),
    "vitq fqvit 8/8/8, no LIS": ("fqvit", {"lis": False, "attn_bits": 8}),
}


def protocol_data(cifar: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import timm
    from torchvision.datasets import ImageFolder

    from vitq.tasks.classification import interleaved_first

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    def take(split: str, n: int) -> torch.Tensor:
        ds = ImageFolder(str(cifar / split))
        return torch.stack([transform(ds[i][0]) for i in interleaved_first(ds.targets, n)])

    return take("train", CALIB), take("val", EVAL)


def float_model() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False).eval()


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]).double()


def compare(q: torch.Tensor, fp: torch.Tensor) -> dict[str, float]:
    return {"agreement": 100.0 * float((q.argmax(1) == fp.argmax(1)).double().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(q, fp, dim=1).mean()),
            "sqnr_db": float(10 * torch.log10(fp.pow(2).sum() / (q - fp).pow(2).sum()))}


def run_case(recipe, calib: torch.Tensor, evaluate: torch.Tensor, fp: torch.Tensor) -> dict:
    import vitq

    model = vitq.quantize(float_model(), recipe)
    start = time.perf_counter()
    vitq.calibrate(model, lambda m: m(calib))
    seconds = time.perf_counter() - start
    return {**compare(logits(model, evaluate), fp), "calib_seconds": seconds, "setting": model.vitq.recipe.describe()}


def fidelity_rows() -> list[dict]:
    import vitq

    cifar = shared("cifar10-small")
    if cifar is None:
        print("skipping fidelity: ../shared/data/cifar10-small not found")
        return []
    torch.set_num_threads(os.cpu_count() or 1)
    calib, evaluate = protocol_data(cifar)
    fp = logits(float_model(), evaluate)
    rows = []
    for label, (name, overrides) in FIDELITY.items():
        row = {"label": label, **run_case(vitq.recipe(name, **overrides), calib, evaluate, fp)}
        rows.append(row)
        print(row, flush=True)
    return rows


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    data["fidelity"] = fidelity_rows()


def report(data: dict) -> list[str]:
    fid = data.get("fidelity", [])
    if not fid:
        return []
    peer = json.loads(PEER.read_text()) if PEER.exists() else {"runs": []}
    lines = ["## Fidelity on DeiT-S beside the published code", "", peer.get("protocol", ""), "",
             "Against the float model's logits: top-1 agreement (% of the 256 images whose argmax is the float "
             "model's; one image is 0.39 points), mean logit cosine, SQNR over all logits. Random weights make "
             "the attention nearly uniform, so this measures faithfulness to float, not accuracy.", "",
             "| run | agreement % | cosine | SQNR dB | calibration s |", "|---|---|---|---|---|"]
    for r in fid:
        lines.append(f"| {r['label']} ({r['setting']}) | {r['agreement']:.2f} | {r['cosine']:.4f} | "
                     f"{r['sqnr_db']:.2f} | {r['calib_seconds']:.1f} |")
    for r in peer["runs"]:
        lines.append(f"| published code: {r['label']} ({r['code']}) | {r['agreement']:.2f} | {r['cosine']:.4f} | "
                     f"{r['sqnr_db']:.2f} | {r['calib_seconds']:.0f}{'' if r.get('idle') else '*'} |")
    return lines + ["", peer.get("how", ""), ""] + side_by_side(peer.get("side_by_side"))


def side_by_side(sbs: dict | None) -> list[str]:
    """The two implementations' quantized outputs against each other (recorded in peer_measurements.json:
    the published code runs outside this repository), beside each code's noise floor."""
    if not sbs:
        return []
    lines = ["### Fidelity to published code", "", sbs["protocol"], "",
             "| method | comparison | cosine | top-1 agreement % | SQNR dB | vitq commit |", "|---|---|---|---|---|---|"]
    for r in sbs["rows"]:
        lines.append(f"| {r['method']} | {r['comparison']} | {r['cosine']:.4f} | {r['agreement']:.2f} | "
                     f"{r['sqnr_db']:.2f} | {r.get('vitq', '–')} |")
    return lines + [""] + [f"- {note}" for note in sbs.get("notes", [])] + [""]
