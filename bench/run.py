"""The benchmark: a loop over its sections, each a module with `ONLY` (its `--only` names), `measure`
and `report` (and `readme` for the sections listed in `README`). Writes docs/results.md and the README summary.

    make bench                                   # everything
    python -m bench.run --only accuracy --models mnist
    python -m bench.run --only fqvit                          # the FQ-ViT ablation (scope `full`)
    python -m bench.run --only reconstruct                    # QDrop, I&S-ViT and its ablation on vit_cifar
    python -m bench.run --only finetune                       # PTQ models + quantization-aware finetuning
    python -m bench.run --only search|fidelity|speed|quickstart|report
    python -m bench.run --only coco                  # COCO detector: calibration, inference, backbone SQNR
    python -m bench.run --only coco-sqnr --coco-sqnr-size 320   # backbone SQNR only, at another size
    python -m bench.run --only coco-recon        # I&S-ViT reconstruction of the detector backbone, SQNR before/after
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import ModuleType

from bench import accuracy, coco, fidelity, finetune, fqvit, quickstart, reconstruct, search, speed
from bench.common import OUT, ROOT, machine

DOC = ROOT / "docs" / "results.md"
# in the order of docs/results.md; `make bench` measures them in this order too
SECTIONS: list[ModuleType] = [accuracy, reconstruct, finetune, fqvit, search, fidelity, speed, coco, quickstart]
README = [accuracy, search, finetune]  # the sections with a line in the README, in its order
ONLY = [name for section in SECTIONS for name in section.ONLY]


def header(argv: list[str]) -> list[str]:
    return [
        "# Benchmark results", "",
        f"Produced by `make bench` (`python -m bench.run`); `python -m bench.run --only {'|'.join(ONLY)}` refreshes "
        "one section and keeps the others, `--only report` rewrites this page from "
        f"`outputs/bench/results.json`. Last written {time.strftime('%Y-%m-%d')} by `python -m bench.run "
        f"{' '.join(argv)}`.", f"Machine: {machine()}.", "",
        "The sections were measured at different commits, several of them before the token samples of the\n"
        "OMSE, quantile and PTF searches were keyed by global batch index (the change that makes multi-process\n"
        "calibration exact). Those searches now see a different random token sample, so rows of recipes that use\n"
        "them (omse, quantile, fqvit's PTF, repq, isvit) may move within sampling noise until `make bench` is run\n"
        "again on one commit. Rows of fqvit, repq, isvit, qdrop, noisyquant and liu21 (and the DeiT-S fidelity rows)\n"
        "were measured before those methods' defaults followed their published code (the protocol cards in\n"
        "docs/methods.md, CHANGELOG.md): they show the former defaults until their sections run again.", "",
        "Every delta is quantized minus float top-1 in points, with its paired 95% bootstrap interval over the "
        "evaluation images (1000 resamples, seed 0) in brackets: an interval that contains 0 is not a measurable "
        "drop. No setting here was chosen by looking at evaluation images.", "",
    ]


def write_report(data: dict, argv: list[str]) -> str:
    lines = header(argv)
    for section in SECTIONS:
        lines += section.report(data)
    return "\n".join(lines) + "\n"


def readme_summary(data: dict) -> str:
    """A few headline rows for the README; the full tables are in docs/results.md."""
    return "".join(section.readme(data) for section in README)


def update_readme(summary: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
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
    save()
    report = write_report(data, argv)
    DOC.write_text(report)
    update_readme(readme_summary(data))
    print(report)


if __name__ == "__main__":
    main()
