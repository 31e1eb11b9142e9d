"""Per-point sensitivity put to use (`--only sensitivity`): vit_cifar at W4A4 MinMax, the k points the analysis
ranks most sensitive kept at 8 bits, against k points drawn at random (several draws), top-1 on cifar10-eval.

The analysis runs on 256 training images, a draw independent of the calibration draw (seed 1, as
`stage=analyze` by default); the evaluation images play no part in choosing the points.
"""
from __future__ import annotations

import argparse
import copy
import random
from typing import Callable

import torch

from bench.common import FIGURES, trained_model

ONLY = ("sensitivity",)
KS = (1, 2, 4, 8)
DRAWS = 5
RECIPE = {"w_bits": 4, "a_bits": 4}


def correct(model, batches) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return torch.cat([(model(x).argmax(-1) == y).float() for x, y in batches])


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    import vitq
    from vitq.report.ci import paired_bootstrap
    from vitq.report.sensitivity import keep_overrides

    torch.set_num_threads(2)
    task, fp = trained_model("cifar")
    if task is None:
        return
    calib = [x for x, _ in task.calib_loader(256, 32, 0)]
    evaluation = list(task.test_loader())

    def quantized(overrides: list[dict]) -> torch.nn.Module:
        q = vitq.quantize(copy.deepcopy(fp), vitq.recipe("minmax", overrides=overrides, **RECIPE))
        return vitq.calibrate(q, lambda m: [m(x) for x in calib])

    base = quantized([])
    report = vitq.analyze(base, list(task.calib_loader(256, 64, 1)), fp_model=fp)
    base_correct = correct(base, evaluation)
    names = [r["name"] for r in report.points]
    rng = random.Random(0)
    rows = []
    for k in KS:
        kept = correct(quantized(report.overrides(k, 8)), evaluation)
        draws = []
        for _ in range(DRAWS):
            pick = rng.sample(names, k)
            draws.append({"points": pick, "vs_base": paired_bootstrap(base_correct, correct(quantized(keep_overrides(pick, 8)), evaluation))})
        rows.append({"k": k, "top": report.top(k, narrower_than=8), "vs_base": paired_bootstrap(base_correct, kept), "random": draws})
        print(f"sensitivity k={k}: analysis {rows[-1]['vs_base']}, random {[d['vs_base'][0] for d in draws]}", flush=True)
        data["sensitivity"] = {"base_top1": 100 * float(base_correct.mean()), "points": len(names), "rows": rows,
                               "images": len(base_correct), "all_sqnr_db": report.totals["all"]["sqnr"]}
        save()
    plot(data["sensitivity"], FIGURES / "sensitivity_topk.png")


def plot(d: dict, path) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitq.files import written_atomically

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(d["rows"]):
        x = i
        delta, low, high = r["vs_base"]
        ax.errorbar([x - 0.1], [delta], yerr=[[delta - low], [high - delta]], fmt="o", color="C0", capsize=4,
                    label="top-k by the analysis" if i == 0 else None)
        for j, draw in enumerate(r["random"]):
            dd, lo, hi = draw["vs_base"]
            ax.errorbar([x + 0.05 + 0.04 * j], [dd], yerr=[[dd - lo], [hi - dd]], fmt="x", color="C3", alpha=0.7,
                        capsize=2, label="k drawn at random" if i == 0 and j == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(d["rows"])), [f"k={r['k']}" for r in d["rows"]])
    ax.set_ylabel("top-1 gain over all-W4A4 (points, 95% CI)")
    ax.set_title(f"vit_cifar MinMax W4A4 ({d['base_top1']:.2f} %): k of {d['points']} points kept at 8 bits")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def report(data: dict) -> list[str]:
    d = data.get("sensitivity")
    if not d:
        return []
    lines = ["## Sensitivity analysis: keeping the top-k points wider", "",
             f"`python -m bench.run --only sensitivity`: vit_cifar, MinMax W4A4 ({d['base_top1']:.2f} % top-1 on "
             f"{d['images']} cifar10-eval images; {d['points']} quantized points, logit SQNR {d['all_sqnr_db']:.2f} dB). "
             "`vitq.analyze` on 256 training images (seed 1, a draw independent of the calibration draw, seed 0) ranks the points by the SQNR "
             "recovered when each alone stays float; the k highest are kept at 8 bits (`analyze.apply`), against "
             f"{DRAWS} draws of k points at random. Each cell: top-1 gain over the all-W4A4 model with its paired 95% "
             "interval.", "", "![top-k](figures/sensitivity_topk.png)", "",
             "| k | kept by the analysis | gain | random draws: gains | mean of the draws |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        draws = ", ".join(f"{x['vs_base'][0]:+.2f}" for x in r["random"])
        mean = sum(x["vs_base"][0] for x in r["random"]) / len(r["random"])
        low, high = r["vs_base"][1], r["vs_base"][2]
        lines.append(f"| {r['k']} | {', '.join(r['top'])} | {r['vs_base'][0]:+.2f} [{low:+.2f}, {high:+.2f}] | {draws} | "
                     f"{mean:+.2f} |")
    return lines + [""]
