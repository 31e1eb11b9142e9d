"""The quick start's wall time, as a new user runs it (`--only quickstart`)."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Callable

from bench.common import OUT, ROOT

ONLY = ("quickstart",)


def quickstart_rows() -> list[dict]:
    """`python train.py` exactly as the quick start runs it: once with an empty cache, once cached."""
    cache = OUT / "quickstart-cache"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for label in ("first run (trains the float model)", "second run (float model cached)"):
        start = time.perf_counter()
        subprocess.run([sys.executable, "train.py", f"paths.cache_dir={cache}",
                        f"paths.output_root={OUT / 'quickstart'}"], cwd=ROOT, check=True,
                       capture_output=True, env={**os.environ, "WANDB_MODE": "offline"})
        rows.append({"run": label, "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    return rows


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    data["quickstart"] = quickstart_rows()


def report(data: dict) -> list[str]:
    quick = data.get("quickstart", [])
    if not quick:
        return []
    lines = ["## Quick start wall time", "", "`python train.py` (defaults: vit_mnist, mnist, fqvit, W&B offline), "
             "including Python start-up:", "", "| run | seconds |", "|---|---|"]
    return lines + [f"| {r['run']} | {r['seconds']:.0f} |" for r in quick] + [""]
