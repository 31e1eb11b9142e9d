"""DeiT-S speed and memory, each case in its own process (`--only speed`; `python -m bench.speed CASE`
is one case)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch

from bench.common import ROOT, peak_mib

ONLY = ("speed",)
SPEED_CASES = {"float": None, "minmax": ("minmax", {}), "fqvit": ("fqvit", {}), "repq": ("repq", {})}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", type=int, default=32, help="speed: calibration images")
    parser.add_argument("--eval", type=int, default=256, help="speed: evaluation images")
    parser.add_argument("--batch", type=int, default=32, help="speed: batch size")


def child(case: str, calib: int, evaluate: int, batch: int, trim: bool) -> dict:
    """One measurement in a fresh process so that its peak RSS is its own."""
    import timm

    import vitq
    from vitq.memory import return_freed_memory

    if trim:
        return_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    calib_x = torch.randn(calib, 3, 224, 224, generator=g)
    eval_x = torch.randn(evaluate, 3, 224, 224, generator=g)
    result = {"case": case}
    if SPEED_CASES[case] is not None:
        name, overrides = SPEED_CASES[case]
        vitq.quantize(model, vitq.recipe(name, **overrides))
        start = time.perf_counter()
        vitq.calibrate(model, lambda m: [m(calib_x[i:i + batch]) for i in range(0, calib, batch)])
        result["calib_seconds"] = time.perf_counter() - start
        result["recipe"] = model.vitq.recipe.describe()
    with torch.inference_mode():
        model(eval_x[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, evaluate, batch):
            model(eval_x[i:i + batch])
        result["eval_seconds"] = time.perf_counter() - start
    result["peak_gib"] = peak_mib() / 1024
    return result


def speed_rows(calib: int = 32, evaluate: int = 256, batch: int = 32, repeats: int = 1) -> list[dict]:
    """Each case in its own process, cases interleaved, `repeats` rounds; the median is reported."""
    runs: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(repeats):
        for trim in (False, True):
            for case in SPEED_CASES:
                proc = subprocess.run(
                    [sys.executable, "-m", "bench.speed", case, "--calib", str(calib), "--eval", str(evaluate),
                     "--batch", str(batch), *(["--trim"] if trim else [])],
                    cwd=ROOT, capture_output=True, text=True, check=True)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.setdefault((case, trim), []).append(row)
                print(row, flush=True)
    rows = []
    for (case, trim), found in runs.items():
        median = lambda key: sorted(r[key] for r in found)[len(found) // 2] if key in found[0] else None  # noqa: E731
        rows.append({"case": case, "allocator": "vitq (trim)" if trim else "glibc default",
                     "recipe": found[0].get("recipe", "float"), "calib_seconds": median("calib_seconds"),
                     "eval_seconds": median("eval_seconds"), "peak_gib": median("peak_gib"),
                     "runs": len(found)})
    return rows


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    data["speed"] = speed_rows(args.calib, args.eval, args.batch)


def report(data: dict) -> list[str]:
    speed = data.get("speed", [])
    if not speed:
        return []
    lines = ["## DeiT-S speed and memory", "",
             "Random weights, 32 calibration images at 224x224, 256 evaluation images, batch 32, each case in "
             "its own process (peak = max RSS of the process); with several rounds (`speed_rows(repeats=...)`) the median. "
             "`glibc default`: the allocator as it comes; `vitq (trim)`: with `vitq.memory.return_freed_memory()`, "
             "which `train.py` (the engine) calls at start-up unless `release_memory=false`. Ratios are against "
             "float under the same setting. Under the glibc default the peak varies from run to run with where small "
             "blocks land (fqvit peaked at 1.58 GiB in one measurement and 3.05 GiB in the next, same code); the trim "
             "setting removes that variation at a cost in evaluation time.",
             "", "| case | allocator | recipe | calibration s | evaluation s | eval vs float | peak GiB | "
             "peak vs float |", "|---|---|---|---|---|---|---|---|"]
    for r in speed:
        fl = next(f for f in speed if f["case"] == "float" and f["allocator"] == r["allocator"])
        calib = "" if r["calib_seconds"] is None else f"{r['calib_seconds']:.1f}"
        lines.append(f"| {r['case']} | {r['allocator']} | {r['recipe']} | {calib} | {r['eval_seconds']:.1f} | "
                     f"{r['eval_seconds'] / fl['eval_seconds']:.2f}x | {r['peak_gib']:.2f} | "
                     f"{r['peak_gib'] / fl['peak_gib']:.2f}x |")
    return lines + [""]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one DeiT-S speed case, printed as JSON")
    parser.add_argument("case", choices=list(SPEED_CASES))
    parser.add_argument("--trim", action="store_true")
    add_arguments(parser)
    a = parser.parse_args()
    print(json.dumps(child(a.case, a.calib, a.eval, a.batch, a.trim)))
