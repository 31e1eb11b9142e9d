"""The benchmark: a loop over its sections, each a module with `ONLY` (its `--only` names), `measure`
and `report` (and `readme` for the sections listed in `README`). Writes docs/results.md and the README summary.

    make bench                                   # everything
    python -m bench.run --only accuracy --models mnist
    python -m bench.run --only fqvit                          # the FQ-ViT ablation (scope `full`)
    python -m bench.run --only reconstruct                    # QDrop, I&S-ViT and its ablation on vit_cifar
    python -m bench.run --only finetune                       # PTQ models + quantization-aware finetuning
    python -m bench.run --only search|fidelity|speed|quickstart|report
    python -m bench.run --only sensitivity               # top-k points by the analysis kept wider vs random k
    python -m bench.run --only deploy-accuracy           # the ONNX export on vit_mnist / vit_cifar, vs quantize_static
    python -m bench.run --only deploy                    # DeiT-S int8 vs fp32 with onnxruntime (an idle machine)
    python -m bench.run --only coco                  # COCO detector: calibration, inference, backbone SQNR
    python -m bench.run --only coco-sqnr --coco-sqnr-size 320   # backbone SQNR only, at another size
    python -m bench.run --only coco-recon        # I&S-ViT reconstruction of the detector backbone, SQNR before/after
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import ModuleType

from bench import (accuracy, coco, deploy, deploy_accuracy, fidelity, finetune, fqvit, quickstart, reconstruct, search,
                   sensitivity, speed)
from bench.common import OUT, ROOT, machine

DOC = ROOT / "docs" / "results.md"
# in the order of docs/results.md; `make bench` measures them in this order too
SECTIONS: list[ModuleType] = [accuracy, reconstruct, finetune, fqvit, search, fidelity, speed, sensitivity,
                              deploy_accuracy, deploy, coco, quickstart]
README = [accuracy, search, finetune]  # the sections with a line in the README, in its order
ONLY = [name for section in SECTIONS for name in section.ONLY]


def header(argv: list[str], measured: dict[str, str], conditions: str = "") -> list[str]:
    refreshed = "; ".join(f"`{name}` at {when}" for name, when in sorted(measured.items()))
    return [
        "# Benchmark results", "",
        f"Produced by `make bench` (`python -m bench.run`); `python -m bench.run --only {'|'.join(ONLY)}` refreshes "
        "one section and keeps the others (from `outputs/bench/results.json`, or where that holds no data for "
        "them, their text on this page), `--only report` rewrites this page from `outputs/bench/results.json`. "
        f"Last written {time.strftime('%Y-%m-%d')} by `python -m bench.run {' '.join(argv)}`.",
        f"Machine: {machine()}.", "",
        "Sections measured since every method's defaults follow its published code (the protocol cards in "
        f"docs/methods.md, CHANGELOG.md): {refreshed or 'none yet'}. The other sections were measured earlier, "
        "under the former defaults of fqvit, repq, isvit, qdrop, noisyquant and liu21, and before the OMSE, "
        "quantile and PTF token samples were keyed by global batch index: their rows of those recipes move when "
        "the section runs again.", *([conditions, ""] if conditions else []),
        "Every delta is quantized minus float top-1 in points, with its paired 95% bootstrap interval over the "
        "evaluation images (1000 resamples, seed 0) in brackets: an interval that contains 0 is not a measurable "
        "drop. No setting here was chosen by looking at evaluation images.", "",
    ]


def blocks(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """A page split at its `## ` headings: (the heading order, heading -> its lines)."""
    order: list[str] = []
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line
            order.append(line)
            found[line] = []
        if current is not None:
            found[current].append(line)
    return order, found


def measured(section: ModuleType, data: dict) -> bool:
    """Whether the store holds a measurement of this section (sections share data keys: the FQ-ViT ablation
    adds rows to the accuracy tables)."""
    if "measured" not in data:  # a store written before sections were recorded: all of it counts
        return True
    return bool(set(data["measured"]) & {*section.ONLY, section.__name__.rsplit(".", 1)[-1]})


def write_report(data: dict, argv: list[str], old: str = "") -> str:
    """The page from `data`; a section the store holds no measurement of keeps its block of the old page (same
    heading), where the old page has one."""
    lines = header(argv, data.get("measured", {}), data.get("conditions", ""))  # how the last runs were made
    old_order, kept = blocks(old)
    fresh, stale = {}, {}
    new_order: list[str] = []
    for section in SECTIONS:
        order, found = blocks("\n".join(section.report(data)))
        new_order += order
        (fresh if measured(section, data) or not kept else stale).update(found)
    order = old_order + [h for h in new_order if h not in kept]
    for heading in order:
        block = fresh.get(heading) or kept.get(heading) or stale[heading]
        lines += block + ([""] if block[-1] else [])  # one blank line between blocks
    return "\n".join(lines).rstrip("\n") + "\n"


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def readme_summary(data: dict) -> str | None:
    """A few headline rows for the README; the full tables are in docs/results.md. None while the store holds
    no measurement of a section of the summary (the README keeps its summary)."""
    if not all(measured(section, data) for section in README):
        return None
    return "".join(section.readme(data) for section in README)


def update_readme(summary: str | None) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if summary is None:
        return
    start, end = "<!-- results-table -->", "<!-- /results-table -->"
    if start not in text:
        return
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else rest
    readme.write_text(f"{head}{start}\n{summary}{end}{tail}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=[*ONLY, "report"], help="one section (kept with the others), or the report")
    parser.add_argument("--models", default="mnist,cifar", help="accuracy / fqvit / search: the small models")
    for section in SECTIONS:
        if hasattr(section, "add_arguments"):
            section.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "results.json"
    data = json.loads(store.read_text()) if store.exists() else {}

    def save() -> None:  # a long section keeps what it measured so far
        store.write_text(json.dumps(data, indent=2, default=str))

    for section in SECTIONS:
        if args.only is None or args.only in section.ONLY:
            section.measure(data, args, save)
            name = args.only or section.__name__.rsplit(".", 1)[-1]
            data.setdefault("measured", {})[name] = f"{commit()} ({time.strftime('%Y-%m-%d')})"
            save()
    save()
    report = write_report(data, argv, DOC.read_text() if DOC.exists() else "")
    DOC.write_text(report)
    update_readme(readme_summary(data))
    print(report)


if __name__ == "__main__":
    main()
