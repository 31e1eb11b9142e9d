"""The export on the trained small models (`--only deploy-accuracy`): onnxruntime against the fake-quant model
(top-1 agreement, logit SQNR) for MinMax W8A8 and the TensorRT-style preset, and the top-1 of vitq's int8 files
against onnxruntime's own `quantize_static` on the same float export and calibration images, with intervals."""
from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch

from bench.common import OUT, trained_model

ONLY = ("deploy-accuracy",)
CASES = {"minmax_w8a8": "minmax", "int8_trt": "int8_trt"}
CALIB = (256, 32, 0)  # images, batch, seed: the engine's default calibration draw (training split)


def onnx_predictions(path, batches) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(logits, labels) of an ONNX file over the evaluation batches."""
    from vitq.export import session

    sess = session(path)
    logits, labels = [], []
    for x, y in batches:
        logits.append(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def torch_predictions(model, batches) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches])


def model_rows(model_key: str) -> dict | None:
    import vitq
    from vitq.report.ci import paired_bootstrap
    from vitq.report.sqnr import sqnr_db

    from bench.deploy import ort_static

    task, fp = trained_model(model_key)
    if task is None:
        return None
    out = OUT / "deploy-accuracy" / model_key
    out.mkdir(parents=True, exist_ok=True)
    calib = [x for x, _ in task.calib_loader(*CALIB)]
    batches = list(task.test_loader())
    example = calib[0][:1]
    fp_path = vitq.export_onnx(fp, out / "fp32.onnx", example).path
    fp_logits, labels = onnx_predictions(fp_path, batches)
    correct = {"fp32": (fp_logits.argmax(-1) == labels).float()}
    result = {"images": len(labels), "cases": {}}
    for case, recipe in CASES.items():
        q = vitq.quantize(copy.deepcopy(fp), recipe)
        vitq.calibrate(q, lambda m: [m(x) for x in calib])
        path = vitq.export_onnx(q, out / f"{case}.onnx", example).path
        fake = torch_predictions(q, batches)
        logits, _ = onnx_predictions(path, batches)
        correct[case] = (logits.argmax(-1) == labels).float()
        result["cases"][case] = {"agreement": 100 * float((fake.argmax(-1) == logits.argmax(-1)).float().mean()),
                                 "sqnr_db": sqnr_db(fake, logits), "fake_top1": 100 * float((fake.argmax(-1) == labels).float().mean())}
    static = ort_static(fp_path, out / "ort_static.onnx", calib)
    logits, _ = onnx_predictions(static, batches)
    correct["ort_static"] = (logits.argmax(-1) == labels).float()
    result["top1"] = {case: 100 * float(c.mean()) for case, c in correct.items()}
    result["vs_float"] = {case: paired_bootstrap(correct["fp32"], c) for case, c in correct.items() if case != "fp32"}
    result["vs_ort_static"] = {case: paired_bootstrap(correct["ort_static"], correct[case]) for case in CASES}
    print(f"deploy-accuracy {model_key}: {result['top1']}", flush=True)
    return result


def measure(data: dict, args: argparse.Namespace, save: Callable[[], None]) -> None:
    data["deploy_accuracy"] = {}
    for key in ("mnist", "cifar"):
        rows = model_rows(key)
        if rows is not None:
            data["deploy_accuracy"][key] = rows
            save()


def _ci(t: list[float] | tuple) -> str:
    return f"{t[0]:+.2f} [{t[1]:+.2f}, {t[2]:+.2f}]"


def report(data: dict) -> list[str]:
    d = data.get("deploy_accuracy")
    if not d:
        return []
    lines = ["## Deployment: the export on the trained models", "",
             "`python -m bench.run --only deploy-accuracy`: each model calibrated on 256 training images (the "
             "engine's default draw), exported by `vitq.export_onnx` and run by onnxruntime (graph optimizations on) "
             "on the whole evaluation set. Agreement: top-1 of the ONNX file equal to the fake-quant PyTorch model's, "
             "image by image; SQNR of the file's logits against the fake-quant logits. onnxruntime's "
             "`quantize_static` (QDQ, int8 activations, per-channel int8 weights, MinMax) runs on the same float "
             "export and the same calibration images. Deltas: paired 95% bootstrap intervals.", "",
             "| model | file | top-1 % | vs float | vs quantize_static | agreement with fake-quant % | SQNR dB |",
             "|---|---|---|---|---|---|---|"]
    for key, r in d.items():
        lines.append(f"| {key} ({r['images']} images) | float | {r['top1']['fp32']:.2f} | | | | |")
        for case in (*CASES, "ort_static"):
            c = r["cases"].get(case)
            agree = "" if c is None else f"{c['agreement']:.2f}"
            snr = "" if c is None else f"{c['sqnr_db']:.1f}"
            versus = _ci(r["vs_ort_static"][case]) if case in r["vs_ort_static"] else ""
            lines.append(f"| | {case} | {r['top1'][case]:.2f} | {_ci(r['vs_float'][case])} | {versus} | {agree} | {snr} |")
    return lines + [""]

