"""Liu et al. 2021 and NoisyQuant on vit_cifar, each against the row it builds on (`--only search`)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from bench.common import (BITS, MODELS, OUT, accuracy_rows, bits_header, cell, invocations, load_average,
                          rows_to_refresh)

ONLY = ("search",)
# label -> overrides. RepQ-ViT stands for "the best uniform recipe": the strongest of vitq's uniform-input
# recipes in the published ImageNet tables (docs/methods.md), not a choice made on these evaluation images.
# NoisyQuant's searches at CPU scale (docs/methods.md: its defaults score every token on 2000 amplitudes)
NOISY_CPU = ["quant.noisy_samples=4096", "quant.noisy_candidates=200", "quant.noisy_clip_candidates=100"]
SEARCH_BASES = {"minmax": ["quant=minmax"], "omse": ["quant=omse"], "repq": ["quant=repq"],
                # NoisyQuant's own points and grids (Linear layers but the head) without its searches
                "linear-sym": ["quant=noisyquant", "quant.noisy=false", "quant.noisy_clip=false"]}
SEARCH = {  # label -> (overrides, the row it is compared with, text)
    "liu21": (["quant=liu21"], "minmax", "Liu et al., fixed width"),
    "liu21-mp": (["quant=liu21", "quant.mixed_precision=true"], "liu21", "Liu et al., mixed precision (same average)"),
    "minmax+noisy": (["quant=minmax", "quant.noisy=true", *NOISY_CPU], "minmax", "MinMax + NoisyQuant noise"),
    "omse+noisy": (["quant=omse", "quant.noisy=true", *NOISY_CPU], "omse", "OMSE + NoisyQuant noise"),
    "repq+noisy": (["quant=repq", "quant.noisy=true", *NOISY_CPU], "repq", "RepQ-ViT + NoisyQuant noise"),
    "noisyquant": (["quant=noisyquant", *NOISY_CPU], "linear-sym",
                   "NoisyQuant (the code's setting: Linear layers but the head, clip search + noise)"),
}


def search_recipes() -> dict[str, list[str]]:
    """The Liu et al. / NoisyQuant rows and the rows they are compared with, at every bit width (scope
    `matmul`, except the rows on NoisyQuant's own recipe, which keep its scope)."""
    rows = {**SEARCH_BASES, **{k: v[0] for k, v in SEARCH.items()}}
    return {f"{k}-w{w}a{a}": [*o, f"quant.w_bits={w}", f"quant.a_bits={a}",
                              *([] if "quant=noisyquant" in o else ["quant.scope=matmul"])]
            for k, o in rows.items() for w, a in BITS}


def paired_deltas(model_key: str, rows: list[dict]) -> list[dict]:
    """Each compared pair: quantized top-1 difference with its paired 95% bootstrap interval over the
    same evaluation images (from the runs' per-image outcomes)."""
    from vitq.report.ci import compare_runs

    by = {r["label"]: r for r in rows}
    out = []
    for key, (_, base, text) in SEARCH.items():
        for w, a in BITS:
            label, ref = f"{key}-w{w}a{a}", f"{base}-w{w}a{a}"
            if label not in by or ref not in by:
                continue
            delta, low, high = compare_runs(OUT / model_key / ref, OUT / model_key / label)
            out.append({"label": label, "base": ref, "text": text, "bits": f"W{w}A{a}", "delta": delta,
                        "ci": [low, high], "calib_seconds": by[label]["calib_seconds"],
                        "base_calib_seconds": by[ref]["calib_seconds"], "bit_map": by[label].get("bit_map"),
                        "avg_block_bits": by[label].get("avg_block_bits")})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search-rows", default=None,
                        help="search: measure again only the rows whose label holds one of these comma-separated "
                             "words (e.g. noisy after a change to NoisyQuant), keeping the others and their run "
                             "directories (the paired intervals read them)")


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    torch.set_num_threads(1)  # calibration times of every compared row under the same setting
    search = data.setdefault("search", {})
    for key in [k for k in args.models.split(",") if k == "cifar"]:
        old = search.get(key, {}).get("rows", [])
        recipes = rows_to_refresh(data, "search", "--search-rows", getattr(args, "search_rows", None),
                                  search_recipes(), old)
        fresh = {r["label"]: r for r in accuracy_rows(key, recipes)}
        rows = [fresh.pop(r["label"], r) for r in old] if "search_refreshed" in data else []
        rows += list(fresh.values())
        argv = search.get(key, {}).get("argv") if "search_refreshed" in data else " ".join(sys.argv[1:])
        search[key] = {"rows": rows, "deltas": paired_deltas(key, rows), "argv": argv, "load": load_average()}
        save()


def _section(data: dict, key: str, block: dict) -> list[str]:
    rows, deltas = block["rows"], block["deltas"]
    by = {r["label"]: r for r in rows}
    model, task, _ = MODELS[key]
    fp = rows[0]["fp_top1"] if rows else float("nan")
    lines = [f"## Liu et al. 2021 and NoisyQuant on {model} ({task})", "",
             f"{_capitalized(invocations(data, 'search', '--search-rows', block['argv']))}, with one intra-op thread "
             f"(`torch.set_num_threads(1)`) on the shared 2-core machine (load average {block['load']}), so the "
             "calibration seconds compare with each other (within one invocation) but are noisy. Scope `matmul`, 256 calibration images "
             "(RepQ-ViT: 32), float top-1 " f"{fp:.2f} % on {rows[0]['eval_samples'] if rows else 0} evaluation "
             "images. Top-1 % (delta vs float [95% CI]); calibration seconds in the second column of each cell.",
             "", *bits_header(BITS, "recipe")]
    for name in [*SEARCH_BASES, *SEARCH]:
        cells = []
        for w, a in BITS:
            r = by.get(f"{name}-w{w}a{a}")
            cells.append("–" if r is None else f"{cell(r)}, {r['calib_seconds']:.1f} s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Each technique against the row it builds on: difference of quantized top-1 (points) with its "
              "paired 95% bootstrap interval over the same images (1000 resamples, seed 0), and both "
              "calibration times.", "", "| comparison | bits | delta [95% CI] | calibration s (base) | note |",
              "|---|---|---|---|---|"]
    for d in deltas:
        note = ""
        if d.get("bit_map"):
            note = f"average {d['avg_block_bits']:.2f} bits: " + ", ".join(
                f"{k.replace('blocks.', 'b')}={v}" for k, v in d["bit_map"].items())
        lines.append(f"| {d['label'].rsplit('-w', 1)[0]} vs {d['base'].rsplit('-w', 1)[0]} | {d['bits']} | "
                     f"{d['delta']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] | {d['calib_seconds']:.1f} "
                     f"({d['base_calib_seconds']:.1f}) | {note} |")
    return lines + [""]


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def report(data: dict) -> list[str]:
    return [line for key, block in data.get("search", {}).items() for line in _section(data, key, block)]


def readme(data: dict) -> str:
    text = ""
    for key, block in data.get("search", {}).items():
        by = {r["label"]: r for r in block["rows"]}
        cells = [f"{name} {by[f'{name}-w6a6']['quant_top1']:.2f}" for name in ("liu21", "liu21-mp", "minmax+noisy",
                                                                              "noisyquant") if f"{name}-w6a6" in by]
        text += (f"\nLiu et al. 2021 and NoisyQuant on {MODELS[key][0]} at W6A6 (top-1 %): " + ", ".join(cells)
                 + "; every comparison with its paired interval and calibration time in docs/results.md.\n")
    return text
