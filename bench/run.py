"""The benchmark: methods x bit widths on the small models (every delta with its 95% interval), the
FQ-ViT ablation, fidelity on DeiT-S beside the published RepQ-ViT / FQ-ViT code, DeiT-S speed and memory,
and the quick start's wall time. Writes docs/results.md and the README summary.

    make bench                                   # everything
    python -m bench.run --only accuracy --models mnist
    python -m bench.run --only reconstruct                    # QDrop, I&S-ViT and its ablation on vit_cifar
    python -m bench.run --only finetune                       # PTQ models + quantization-aware finetuning
    python -m bench.run --only fidelity|speed|quickstart|report
    python -m bench.run --only coco                  # COCO detector: calibration, inference, backbone SQNR
    python -m bench.run --only coco-sqnr --coco-sqnr-size 320   # backbone SQNR only, at another size
    python -m bench.run --only coco-recon        # I&S-ViT reconstruction of the detector backbone, SQNR before/after
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench"
DOC = ROOT / "docs" / "results.md"
PEER = ROOT / "bench" / "peer_measurements.json"
sys.path.insert(0, str(ROOT))

MODELS = {  # key -> (model config, task config, extra overrides)
    "mnist": ("vit_mnist", "mnist", []),
    "cifar": ("vit_cifar", "cifar10", ["task.root={cifar}", "task.eval_root={cifar_eval}"]),
}
BITS = [(8, 8), (6, 6), (4, 4)]
METHODS = ["minmax", "percentile", "omse", "repq"]
FQVIT = {  # label -> (overrides, text)
    "fqvit-minmax-888": (["quant=fqvit", "quant.ptf=false", "quant.lis=false", "quant.attn_bits=8"], "MinMax 8/8/8"),
    "fqvit-ptf-888": (["quant=fqvit", "quant.lis=false", "quant.attn_bits=8"], "MinMax + PTF 8/8/8"),
    "fqvit-ptf-lis-884-minmax": (["quant=fqvit"], "MinMax + PTF + LIS 8/8/4 (FQ-ViT)"),
    "fqvit-ptf-lis-884-ema": (["quant=fqvit", "quant.observer=ema"], "EMA + PTF + LIS 8/8/4"),
    "fqvit-ptf-lis-884-percentile": (["quant=fqvit", "quant.observer=percentile"], "Percentile + PTF + LIS 8/8/4"),
    "fqvit-ptf-lis-884-omse": (["quant=fqvit", "quant.observer=omse"], "OMSE + PTF + LIS 8/8/4"),
    "fqvit-ptf-lis-884-minmax-integer": (["quant=fqvit", "quant.integer=true"],
                                         "MinMax + PTF + LIS 8/8/4, integer LayerNorm/softmax"),
}
FIDELITY = {  # label -> (recipe name, overrides)
    "vitq minmax W4A4": ("minmax", {"w_bits": 4, "a_bits": 4}),
    "vitq repq W4A4": ("repq", {}),
    "vitq repq W6A6": ("repq", {"w_bits": 6, "a_bits": 6}),
    "vitq fqvit 8/8/4": ("fqvit", {}),
    "vitq fqvit 8/8/8, no LIS": ("fqvit", {"lis": False, "attn_bits": 8}),
}
# Liu et al. 2021 and NoisyQuant on vit_cifar: label -> (overrides, the row it is compared with, text).
# RepQ-ViT stands for "the best uniform recipe": the strongest of vitq's uniform-input recipes in the
# published ImageNet tables (docs/methods.md), not a choice made on these evaluation images.
SEARCH_BASES = {"minmax": ["quant=minmax"], "omse": ["quant=omse"], "repq": ["quant=repq"]}
SEARCH = {
    "liu21": (["quant=liu21"], "minmax", "Liu et al., fixed width"),
    "liu21-mp": (["quant=liu21", "quant.mixed_precision=true"], "liu21", "Liu et al., mixed precision (same average)"),
    "minmax+noisy": (["quant=minmax", "quant.noisy=true"], "minmax", "MinMax + NoisyQuant noise"),
    "omse+noisy": (["quant=omse", "quant.noisy=true"], "omse", "OMSE + NoisyQuant noise"),
    "repq+noisy": (["quant=repq", "quant.noisy=true"], "repq", "RepQ-ViT + NoisyQuant noise"),
    "noisyquant": (["quant=noisyquant"], "minmax", "NoisyQuant (paper setting: symmetric, clip search + noise)"),
}
SPEED_CASES = {"float": None, "minmax": ("minmax", {}), "fqvit": ("fqvit", {}), "repq": ("repq", {})}
# Reconstruction methods on vit_cifar at CPU scale: 256 calibration images (= the reconstruction set),
# mini-batches of 32, 100 iterations per unit and pass (20 at W6A6: the paper's 1000/200 ratio).
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


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def compose(overrides: list[str]):  # noqa: ANN201
    from hydra import compose as hcompose, initialize_config_dir

    import vitq.engine.config  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose("config", overrides=overrides)


def shared(name: str) -> Path | None:
    from vitq.tasks.classification import find_shared_data

    return find_shared_data(name)


# ---------------------------------------------------------------------------------------------- accuracy
def accuracy_rows(model_key: str, recipes: dict[str, list[str]], on_row=None) -> list[dict]:  # noqa: ANN001
    """The real pipeline (vitq.engine.run) per recipe; the float model is trained once and cached."""
    from vitq.engine.run import run

    model, task, extra = MODELS[model_key]
    cifar, cifar_eval = shared("cifar10-small"), shared("cifar10-eval")
    if task == "cifar10" and (cifar is None or cifar_eval is None):
        print("skipping CIFAR: ../shared/data/cifar10-small or cifar10-eval not found")
        return []
    extra = [e.format(cifar=cifar, cifar_eval=cifar_eval) for e in extra]
    rows = []
    for label, overrides in recipes.items():
        cfg = compose([f"model={model}", f"task={task}", "logger=csv", *extra, *overrides])
        start = time.perf_counter()
        row = run(cfg, OUT / model_key / label)
        row.update(label=label, seconds=round(time.perf_counter() - start, 1))
        rows.append(row)
        if on_row is not None:  # a long section keeps what it measured so far
            on_row(rows)
        print(f"{model_key} {label}: fp {row['fp_top1']:.2f} quant {row['quant_top1']:.2f} "
              f"delta {row['delta_top1']:+.2f} {row['delta_top1_ci']}", flush=True)
    return rows


def search_recipes() -> dict[str, list[str]]:
    """The Liu et al. / NoisyQuant rows and the rows they are compared with, at every bit width."""
    rows = {**SEARCH_BASES, **{k: v[0] for k, v in SEARCH.items()}}
    return {f"{k}-w{w}a{a}": [*o, f"quant.w_bits={w}", f"quant.a_bits={a}", "quant.scope=matmul"]
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


def method_recipes() -> dict[str, list[str]]:
    return {f"{m}-w{w}a{a}": [f"quant={m}", f"quant.w_bits={w}", f"quant.a_bits={a}", "quant.scope=matmul"]
            for m in METHODS for w, a in BITS}


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


def float_training_info(model_key: str) -> dict:
    from vitq.engine.float_model import cache_dir

    model, task, _ = MODELS[model_key]
    files = sorted(cache_dir(None).glob(f"{model}-{task}-*.pt"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    ckpt = torch.load(files[-1], map_location="cpu", weights_only=False)
    return {"train_seconds": ckpt.get("train_seconds"), "epochs": ckpt.get("fit", {}).get("epochs")}


# ---------------------------------------------------------------------------------------------- fidelity
def fidelity_rows() -> list[dict]:
    from bench import fidelity

    import vitq

    cifar = shared("cifar10-small")
    if cifar is None:
        print("skipping fidelity: ../shared/data/cifar10-small not found")
        return []
    torch.set_num_threads(os.cpu_count() or 1)
    calib, evaluate = fidelity.protocol_data(cifar)
    fp = fidelity.logits(fidelity.float_model(), evaluate)
    rows = []
    for label, (name, overrides) in FIDELITY.items():
        row = {"label": label, **fidelity.run_case(vitq.recipe(name, **overrides), calib, evaluate, fp)}
        rows.append(row)
        print(row, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- speed
def speed_child(case: str, calib: int, evaluate: int, batch: int, trim: bool) -> dict:
    """One measurement in a fresh process so that its peak RSS is its own."""
    import resource

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
        result["recipe"] = model.vitq_recipe.describe()
    with torch.inference_mode():
        model(eval_x[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, evaluate, batch):
            model(eval_x[i:i + batch])
        result["eval_seconds"] = time.perf_counter() - start
    result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def speed_rows(calib: int = 32, evaluate: int = 256, batch: int = 32, repeats: int = 1) -> list[dict]:
    """Each case in its own process, cases interleaved, `repeats` rounds; the median is reported."""
    runs: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(repeats):
        for trim in (False, True):
            for case in SPEED_CASES:
                proc = subprocess.run(
                    [sys.executable, "-m", "bench.run", "--speed-child", case, "--calib", str(calib), "--eval",
                     str(evaluate), "--batch", str(batch), *(["--trim"] if trim else [])],
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


# ---------------------------------------------------------------------------------------------- report
def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    low, high = row["delta_top1_ci"]
    return f"{row['quant_top1']:.2f} ({row['delta_top1']:+.2f} [{low:+.2f}, {high:+.2f}])"


def _method_table(rows: list[dict]) -> list[str]:
    by = {r["label"]: r for r in rows}
    lines = ["| method | " + " | ".join(f"W{w}A{a}" for w, a in BITS) + " |", "|---|" + "---|" * len(BITS)]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(_cell(by.get(f"{m}-w{w}a{a}")) for w, a in BITS) + " |")
    return lines


# ---------------------------------------------------------------------------------------------- coco
def coco_rows(previous: dict, sqnr_only: bool = False, sqnr_size: int = 800, recipes: list[str] | None = None) -> dict:
    """The COCO detector section (bench/coco.py); each speed case in its own process. `sqnr_only` keeps
    the previous speed rows; SQNR rows are kept per image size."""
    import tempfile

    from bench import coco

    mini = shared("coco-mini")
    if mini is None:
        print("skipping coco: ../shared/data/coco-mini not found")
        return previous
    root = coco.coco_mini_root(mini, Path(tempfile.mkdtemp()))
    fresh = [{**r, "short_side": sqnr_size} for r in coco.sqnr_rows(root, sqnr_size, recipes)]
    done = {(r["short_side"], r["label"]) for r in fresh}
    sqnr = [r for r in previous.get("sqnr", []) if (r.get("short_side"), r["label"]) not in done] + fresh
    if sqnr_only:
        return {**previous, "sqnr": sqnr}
    speed = []
    for case in coco.SPEED_CASES:
        proc = subprocess.run([sys.executable, "-m", "bench.run", "--coco-child", case, "--coco-root", str(root)],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        speed.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(speed[-1], flush=True)
    return {**previous, "speed": speed, "sqnr": sqnr}


def coco_recon_rows(previous: dict, img_size: int) -> dict:
    """I&S-ViT reconstruction of the detector's backbone units (bench/coco.py `recon_run`), kept per size."""
    import tempfile

    from bench import coco

    mini = shared("coco-mini")
    if mini is None:
        print("skipping coco-recon: ../shared/data/coco-mini not found")
        return previous
    work = Path(tempfile.mkdtemp(prefix="vitq-coco-recon-"))
    row = coco.recon_run(coco.coco_mini_root(mini, work), work, img_size=img_size)
    print({k: v for k, v in row.items() if k != "units"}, flush=True)
    recon = [r for r in previous.get("recon", []) if r["img_size"] != img_size] + [row]
    return {**previous, "recon": recon}


def write_report(data: dict, argv: list[str]) -> str:
    acc, fid, speed, quick = data["accuracy"], data.get("fidelity", []), data.get("speed", []), data.get("quickstart", [])
    lines = [
        "# Benchmark results", "",
        "Produced by `make bench` (`python -m bench.run`); `python -m bench.run --only accuracy|fqvit|search|"
        "reconstruct|finetune|fidelity|speed|quickstart|coco|coco-sqnr|coco-recon` refreshes one section and keeps the others, "
        "`--only report` rewrites this page from "
        f"`outputs/bench/results.json`. Last written {time.strftime('%Y-%m-%d')} by `python -m bench.run "
        f"{' '.join(argv)}`.", f"Machine: {machine()}.", "",
        "The sections were measured at different commits, several of them before the token samples of the\n"
        "OMSE, quantile and PTF searches were keyed by global batch index (the change that makes multi-process\n"
        "calibration exact). Those searches now see a different random token sample, so rows of recipes that use\n"
        "them (omse, quantile, fqvit's PTF, repq, isvit) may move within sampling noise until `make bench` is run\n"
        "again on one commit.", "",
        "Every delta is quantized minus float top-1 in points, with its paired 95% bootstrap interval over the "
        "evaluation images (1000 resamples, seed 0) in brackets: an interval that contains 0 is not a measurable "
        "drop. No setting here was chosen by looking at evaluation images.", "",
    ]
    for key, rows in acc.items():
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
    lines += _recon_section(data.get("reconstruct", []))
    from bench import finetune

    lines += finetune.section(data.get("finetune") or {})
    fq = {k: {r["label"]: r for r in rows if r["label"].startswith("fqvit")} for k, rows in acc.items()}
    keys = [k for k in fq if fq[k]]
    if keys:
        lines += ["## FQ-ViT ablation (scope `full`)", "",
                  "Top-1 % (delta [95% CI]); W/A/attention bits; 1000 calibration images in batches of 100, as the "
                  "paper. Scope `full` also quantizes LayerNorm inputs (the residual stream), layer outputs and "
                  "attention scores, so these rows are not comparable with the `matmul` tables above.", "",
                  "| method | " + " | ".join(MODELS[k][0] for k in keys) + " |", "|---|" + "---|" * len(keys),
                  "| float | " + " | ".join(f"{next(iter(fq[k].values()))['fp_top1']:.2f}" for k in keys) + " |"]
        for label, (_, text) in FQVIT.items():
            lines.append(f"| {text} | " + " | ".join(_cell(fq[k].get(label)) for k in keys) + " |")
        lines.append("")
        for k in keys:
            fig = ROOT / "docs" / "figures" / f"layernorm_ranges_{MODELS[k][0]}.png"
            if fig.exists():
                lines += [f"![LayerNorm input ranges, {MODELS[k][0]}](figures/{fig.name})", ""]
    search = data.get("search", {})
    for key, block in search.items():
        lines += _search_section(key, block)
    if fid:
        peer = json.loads(PEER.read_text()) if PEER.exists() else {"runs": []}
        lines += ["## Fidelity on DeiT-S beside the published code", "", peer.get("protocol", ""), "",
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
        lines += ["", peer.get("how", ""), ""]
    if speed:
        lines += ["## DeiT-S speed and memory", "",
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
        lines.append("")
    if data.get("coco"):
        from bench import coco

        lines += coco.report_lines(data["coco"])
    if quick:
        lines += ["## Quick start wall time", "", "`python train.py` (defaults: vit_mnist, mnist, fqvit, W&B offline), "
                  "including Python start-up:", "", "| run | seconds |", "|---|---|"]
        lines += [f"| {r['run']} | {r['seconds']:.0f} |" for r in quick]
        lines.append("")
    return "\n".join(lines) + "\n"


def _search_section(key: str, block: dict) -> list[str]:
    rows, deltas = block["rows"], block["deltas"]
    by = {r["label"]: r for r in rows}
    model, task, _ = MODELS[key]
    fp = rows[0]["fp_top1"] if rows else float("nan")
    lines = [f"## Liu et al. 2021 and NoisyQuant on {model} ({task})", "",
             f"`python -m bench.run {block['argv']}`, all rows in that one invocation with one intra-op thread "
             f"(`torch.set_num_threads(1)`) on the shared 2-core machine (load average {block['load']}), so the "
             "calibration seconds compare with each other but are noisy. Scope `matmul`, 256 calibration images "
             "(RepQ-ViT: 32), float top-1 " f"{fp:.2f} % on {rows[0]['eval_samples'] if rows else 0} evaluation "
             "images. Top-1 % (delta vs float [95% CI]); calibration seconds in the second column of each cell.",
             "", "| recipe | " + " | ".join(f"W{w}A{a}" for w, a in BITS) + " |", "|---|" + "---|" * len(BITS)]
    names = [*SEARCH_BASES, *SEARCH]
    for name in names:
        cells = []
        for w, a in BITS:
            r = by.get(f"{name}-w{w}a{a}")
            cells.append("–" if r is None else f"{_cell(r)}, {r['calib_seconds']:.1f} s")
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


def _recon_section(rows: list[dict]) -> list[str]:
    """The reconstruction table (methods x bits with intervals) and the per-unit cost of each run."""
    if not rows:
        return []
    by = {r["label"]: r for r in rows}
    r0 = rows[0]
    lines = ["## Block reconstruction: QDrop, I&S-ViT and its ablation (vit_cifar, scope `matmul`)", "",
             f"Float top-1 {r0['fp_top1']:.2f} % on {r0['eval_samples']} evaluation images (cifar10-eval); every "
             "row measured in one invocation (`python -m bench.run --only reconstruct`), one intra-op thread. "
             "Quantized top-1 % (delta [95% CI]). CPU scale: QDrop and I&S-ViT calibrate and reconstruct on 256 "
             "images of cifar10-small/train (the paper: 1024), mini-batches of 32 (the paper: 64; QDrop 32), 100 "
             "iterations per unit and pass at W3A3/W4A4 and 20 at W6A6 (the paper: 1000/200; QDrop 20000), all "
             "other hyper-parameters as published. Ablation rows are I&S-ViT with `quant.sulq=false` (uniform "
             "attention probabilities) and/or `quant.sos=false` (post-LayerNorm inputs per tensor, stage 3 alone).",
             "", "| method | " + " | ".join(f"W{w}A{a}" for w, a in RECON_BITS) + " |",
             "|---|" + "---|" * len(RECON_BITS)]
    for m, (_, text) in RECON_METHODS.items():
        lines.append(f"| {text} | " + " | ".join(_cell(by.get(f"recon-{m}-w{w}a{a}")) for w, a in RECON_BITS) + " |")
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
    lines += ["", "Reconstruction cost per run (wall seconds of the stage; per unit: mean seconds, largest cache, "
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
    return lines + [""]


def readme_summary(data: dict) -> str:
    """A few headline rows for the README; the full tables are in docs/results.md."""
    lines = ["| model | float | MinMax W4A4 | OMSE W4A4 | RepQ-ViT W4A4 | RepQ-ViT W6A6 | FQ-ViT 8/8/4 (full) |",
             "|---|---|---|---|---|---|---|"]
    for key, rows in data["accuracy"].items():
        by = {r["label"]: r for r in rows}
        if not rows:
            continue
        cells = [f"{rows[0]['fp_top1']:.2f}"] + [
            f"{by[label]['quant_top1']:.2f} ({by[label]['delta_top1']:+.2f} ± "
            f"{(by[label]['delta_top1_ci'][1] - by[label]['delta_top1_ci'][0]) / 2:.2f})" if label in by else "–"
            for label in ("minmax-w4a4", "omse-w4a4", "repq-w4a4", "repq-w6a6", "fqvit-ptf-lis-884-minmax")]
        lines.append(f"| {MODELS[key][0]} ({MODELS[key][1]}, {rows[0]['eval_samples']} images) | " + " | ".join(cells) + " |")
    text = ("Top-1 % (delta vs float ± half its 95% interval), `make bench`; details, the FQ-ViT ablation, DeiT-S "
            "fidelity beside the published RepQ-ViT / FQ-ViT code, and speed in [docs/results.md](docs/results.md):"
            "\n\n" + "\n".join(lines) + "\n")
    for key, block in data.get("search", {}).items():
        by = {r["label"]: r for r in block["rows"]}
        cells = [f"{name} {by[f'{name}-w6a6']['quant_top1']:.2f}" for name in ("liu21", "liu21-mp", "minmax+noisy",
                                                                              "noisyquant") if f"{name}-w6a6" in by]
        text += (f"\nLiu et al. 2021 and NoisyQuant on {MODELS[key][0]} at W6A6 (top-1 %): " + ", ".join(cells)
                 + "; every comparison with its paired interval and calibration time in docs/results.md.\n")
    from bench import finetune

    text += finetune.readme_line(data.get("finetune") or {})
    return text


def update_readme(summary: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- results-table -->", "<!-- /results-table -->"
    if start not in text:
        return
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else rest
    readme.write_text(f"{head}{start}\n{summary}{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["accuracy", "fqvit", "search", "reconstruct", "finetune", "fidelity", "speed",
                                           "quickstart", "coco", "coco-sqnr", "coco-recon", "report"])
    parser.add_argument("--coco-sqnr-size", type=int, default=800, help="short side of the SQNR images")
    parser.add_argument("--coco-recon-size", type=int, default=320, help="short side of the reconstruction images")
    parser.add_argument("--coco-recipes", default=None, help="comma-separated SQNR labels (bench/coco.py); all if unset")
    parser.add_argument("--coco-child", default=None)
    parser.add_argument("--coco-root", default=None)
    parser.add_argument("--models", default="mnist,cifar")
    parser.add_argument("--speed-child", default=None)
    parser.add_argument("--trim", action="store_true")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.coco_child:
        from bench import coco

        print(json.dumps(coco.speed_child(args.coco_child, Path(args.coco_root))))
        return
    if args.speed_child:
        print(json.dumps(speed_child(args.speed_child, args.calib, args.eval, args.batch, args.trim)))
        return
    os.environ.setdefault("WANDB_MODE", "offline")
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "results.json"
    data = json.loads(store.read_text()) if store.exists() else {}
    data.setdefault("accuracy", {})
    if args.only in (None, "accuracy", "fqvit"):
        for key in args.models.split(","):
            recipes = {} if args.only == "fqvit" else method_recipes()
            if args.only in (None, "accuracy", "fqvit"):
                recipes.update({label: overrides for label, (overrides, _) in FQVIT.items()})
            rows = accuracy_rows(key, recipes)
            fresh = {r["label"] for r in rows}
            data["accuracy"][key] = [r for r in data["accuracy"].get(key, []) if r["label"] not in fresh] + rows
            src = OUT / key / "fqvit-ptf-lis-884-minmax" / "layernorm_ranges.png"
            if src.exists():
                (ROOT / "docs" / "figures").mkdir(parents=True, exist_ok=True)
                shutil.copy(src, ROOT / "docs" / "figures" / f"layernorm_ranges_{MODELS[key][0]}.png")
    if args.only in (None, "search"):
        torch.set_num_threads(1)  # calibration times of every compared row under the same setting
        data.setdefault("search", {})
        for key in [k for k in args.models.split(",") if k == "cifar"]:
            rows = accuracy_rows(key, search_recipes())
            data["search"][key] = {"rows": rows, "deltas": paired_deltas(key, rows), "argv": " ".join(sys.argv[1:]),
                                   "load": " / ".join(f"{v:.1f}" for v in os.getloadavg())}
    if args.only in (None, "reconstruct"):
        torch.set_num_threads(1)  # a shared 2-core machine: one thread, every row in this one process
        def keep(rows: list[dict]) -> None:
            data["reconstruct"] = rows
            store.write_text(json.dumps(data, indent=2, default=str))

        keep(accuracy_rows("cifar", recon_recipes(), on_row=keep))
    if args.only in (None, "finetune"):
        from bench import finetune

        torch.set_num_threads(1)

        def keep_ft(rows: list[dict]) -> None:
            figure = ROOT / "docs" / "figures" / "finetune_validation.png"
            data["finetune"] = {"rows": rows, "paired": finetune.paired(OUT, rows), "argv": " ".join(sys.argv[1:]),
                                "load": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
                                "figure": "figures/finetune_validation.png"
                                if finetune.plot_validation(OUT, rows, figure) else None}
            store.write_text(json.dumps(data, indent=2, default=str))

        keep_ft(finetune.run_rows(accuracy_rows, OUT, on_row=keep_ft))
    if args.only in (None, "fidelity"):
        data["fidelity"] = fidelity_rows()
    if args.only in (None, "speed"):
        data["speed"] = speed_rows(args.calib, args.eval, args.batch)
    if args.only in (None, "quickstart"):
        data["quickstart"] = quickstart_rows()
    if args.only in (None, "coco", "coco-sqnr"):
        data["coco"] = coco_rows(data.get("coco") or {}, args.only == "coco-sqnr", args.coco_sqnr_size,
                                 args.coco_recipes.split(",") if args.coco_recipes else None)
    if args.only in (None, "coco", "coco-recon"):
        data["coco"] = coco_recon_rows(data.get("coco") or {}, args.coco_recon_size)
    store.write_text(json.dumps(data, indent=2, default=str))
    report = write_report(data, sys.argv[1:])
    DOC.write_text(report)
    update_readme(readme_summary(data))
    print(report)


if __name__ == "__main__":
    main()
