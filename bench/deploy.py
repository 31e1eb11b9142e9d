"""DeiT-S (random weights) exported float and int8, run by onnxruntime on this CPU (`--only deploy`).

Every timing is its own fresh process (`python -m bench.deploy time <file> --batch N`), the cases interleaved
round after round, and the median reported with the load average. onnxruntime's graph optimizations are on.
The int8 files: vitq's TensorRT-style preset (`quant=int8_trt`), vitq's MinMax W8A8 (every matmul, also the
attention's) and onnxruntime's own `quantize_static` on the same float export and calibration images.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from bench.common import OUT, ROOT, load_average, peak_mib

ONLY = ("deploy",)
DIR = OUT / "deploy"
FILES = {"fp32": "deit_s.fp32.onnx", "int8_trt": "deit_s.int8_trt.onnx", "minmax_w8a8": "deit_s.minmax.onnx",
         "ort_static": "deit_s.ort_static.onnx"}
TEXT = {"fp32": "float", "int8_trt": "vitq int8_trt (linear layers int8)", "minmax_w8a8": "vitq MinMax W8A8 (also attention matmuls)",
        "ort_static": "onnxruntime quantize_static (QDQ, per-channel int8)"}
BATCHES = (1, 32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deploy-rounds", type=int, default=5, help="deploy: interleaved rounds per case")


def calibration_images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def ort_static(fp_path: Path, out: Path, batches: list[torch.Tensor]) -> Path:
    """onnxruntime's quantize_static on the float export: QDQ format, int8 activations and per-channel int8
    weights, MinMax calibration on the same images vitq calibrates on."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feed = iter([{"input": x.numpy()} for x in batches])

        def get_next(self) -> dict | None:
            return next(self.feed, None)

    quantize_static(str(fp_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def build() -> dict[str, Path]:
    """The four DeiT-S files (rebuilt each time: seconds against the minutes of timing)."""
    import timm

    import vitq

    DIR.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = calibration_images()
    paths = {case: DIR / name for case, name in FILES.items()}
    vitq.export_onnx(model, paths["fp32"], x[:1])
    for case, recipe in (("int8_trt", "int8_trt"), ("minmax_w8a8", "minmax")):
        q = vitq.quantize(copy.deepcopy(model), recipe)
        vitq.calibrate(q, lambda m: [m(x[i:i + 8]) for i in range(0, len(x), 8)])
        vitq.export_onnx(q, paths[case], x[:1])
    ort_static(paths["fp32"], paths["ort_static"], [x[i:i + 8] for i in range(0, len(x), 8)])
    return paths


def timed(call: Callable[[], object], batch: int, runs: int) -> dict:
    """One warm-up call, then the median latency of `runs` calls, the throughput and this process's peak."""
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    latency = sorted(times)[len(times) // 2]
    return {"latency_ms": 1000 * latency, "images_per_s": batch / latency, "peak_mib": peak_mib()}


def time_child(path: str, batch: int, runs: int) -> dict:
    """One file at one batch size in this (fresh) process: median latency of `runs` timed runs after one
    warm-up, throughput, and the process's peak RSS."""
    import numpy as np

    from vitq.export import session

    sess = session(path, threads=os.cpu_count())
    feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    return timed(lambda: sess.run(None, feed), batch, runs)


def torch_child(case: str, batch: int, runs: int) -> dict:
    """The PyTorch fake-quant model (or float) at one batch size: what simulating the quantization costs."""
    import timm

    import vitq

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    if case != "fp32":
        x = calibration_images()
        vitq.quantize(model, "int8_trt" if case == "int8_trt" else "minmax")
        vitq.calibrate(model, lambda m: [m(x[i:i + 8]) for i in range(0, len(x), 8)])
    feed = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return timed(lambda: model(feed), batch, runs)


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.deploy", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed_rows(paths: dict[str, Path], rounds: int) -> list[dict]:
    """Every (runtime, case, batch) in its own process, interleaved, `rounds` times; medians."""
    runs: dict[tuple[str, str, int], list[dict]] = {}
    loads = []
    for _ in range(rounds):
        for batch in BATCHES:
            timed = 20 if batch == 1 else 3
            for case, path in paths.items():
                runs.setdefault(("onnxruntime", case, batch), []).append(_child(["time", str(path), "--batch", str(batch),
                                                                                 "--runs", str(timed)]))
            for case in ("fp32", "int8_trt"):
                runs.setdefault(("pytorch", case, batch), []).append(_child(["torch", case, "--batch", str(batch),
                                                                             "--runs", str(timed)]))
        loads.append(load_average())
        print(f"deploy: round done, load {loads[-1]}", flush=True)
    rows = []
    for (runtime, case, batch), found in runs.items():
        median = lambda key: sorted(r[key] for r in found)[len(found) // 2] if key in found[0] else None  # noqa: E731
        rows.append({"runtime": runtime, "case": case, "batch": batch, "latency_ms": median("latency_ms"),
                     "images_per_s": median("images_per_s"), "peak_mib": median("peak_mib"),
                     "bytes": paths[case].stat().st_size if runtime == "onnxruntime" else None, "runs": len(found)})
    return rows, loads


def profile(path: Path, batch: int = 32) -> dict:
    """Where an int8 file's time goes: onnxruntime's profiler, time share per operator type, and the operator
    counts of the graph onnxruntime actually runs (which matmuls stay float, which Q/DQ were not fused)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from vitq.export import session

    prefix = str(DIR / f"profile-{path.stem}")
    sess = session(path, threads=os.cpu_count(), profile=prefix)
    feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    for _ in range(3):
        sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    by_op: Counter = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values()) or 1
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(DIR / f"optimized-{path.name}")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nodes = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {"share": {op: round(100 * t / total, 1) for op, t in by_op.most_common(10)}, "nodes": dict(nodes)}


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    paths = build()
    rows, loads = speed_rows(paths, args.deploy_rounds)
    data["deploy"] = {"rows": rows, "loads": loads, "rounds": args.deploy_rounds,
                      "profile": {case: profile(paths[case]) for case in ("int8_trt", "ort_static", "fp32")}}
    save()


def report(data: dict) -> list[str]:
    d = data.get("deploy")
    if not d:
        return []
    rows = d["rows"]
    ref = {(r["runtime"], r["batch"]): r for r in rows if r["case"] == "fp32"}
    lines = ["## Deployment: DeiT-S with onnxruntime (int8 against fp32)", "",
             f"`python -m bench.run --only deploy`: DeiT-S (`deit_small_patch16_224`, random weights, 32 random "
             f"calibration images), exported by `vitq.export_onnx`; each cell the median of {d['rounds']} interleaved "
             "rounds, every measurement in a fresh process (onnxruntime CPU, graph optimizations on, 2 threads; "
             "batch 1: median of 20 runs, batch 32: of 3, after one warm-up; peak = the process's peak RSS, VmHWM, "
             "which for PyTorch includes building and calibrating the model). "
             f"Load average after each round: {', '.join(d['loads'])}. The PyTorch rows time the fake-quant "
             "simulation (what `vitq` evaluates with) against the float model.", "",
             "| runtime | model | batch | latency ms | images/s | vs fp32 | peak MiB | file MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["runtime"] != "onnxruntime", r["batch"], list(FILES).index(r["case"]))):
        base = ref[(r["runtime"], r["batch"])]
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        size = "" if r["bytes"] is None else f"{r['bytes'] / 2**20:.1f}"
        lines.append(f"| {r['runtime']} | {TEXT[r['case']]} | {r['batch']} | {r['latency_ms']:.1f} | "
                     f"{r['images_per_s']:.1f} | {r['images_per_s'] / base['images_per_s']:.2f}x | {peak} | {size} |")
    lines += ["", "Where the time goes at batch 32 (onnxruntime's profiler, share of kernel time per operator, and "
              "the operators of the graph onnxruntime runs after its optimizations):", ""]
    for case, prof in d["profile"].items():
        share = ", ".join(f"{op} {pct}%" for op, pct in prof["share"].items())
        kinds = ", ".join(f"{op} x{n}" for op, n in sorted(prof["nodes"].items(), key=lambda kv: -kv[1])[:10])
        lines.append(f"- {TEXT[case]}: {share}. Graph: {kinds}.")
    return lines + [""]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one deployment timing, printed as JSON")
    parser.add_argument("what", choices=["time", "torch"])
    parser.add_argument("target", help="time: an ONNX file; torch: fp32 | int8_trt")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    a = parser.parse_args()
    result = time_child(a.target, a.batch, a.runs) if a.what == "time" else torch_child(a.target, a.batch, a.runs)
    print(json.dumps(result))
