"""Checks of an exported file: onnxruntime against the fake-quant PyTorch model, and the Q/DQ structure an
int8 runtime needs (every quantized MatMul / Gemm / Conv input fed by a DequantizeLinear)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .onnx_model import evaluating

COMPUTE = ("MatMul", "Gemm", "Conv")


def session(path: str | Path, threads: int | None = None, optimize: bool = True,
            profile: str | None = None) -> Any:
    """An onnxruntime CPU session with its graph optimizations on (off with `optimize=False`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_input(batch: Any) -> torch.Tensor:
    """The image tensor of a batch (the first element of a tuple or list): what an exported model takes."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"an exported model takes one image tensor; this data gives {type(x).__name__} batches. "
                         "stage=analyze and stage=export take tasks whose batches start with an image tensor "
                         "(classification); from Python, vitq.analyze(model, batches, forward=...) takes any "
                         "forward that returns tensors")
    return x


def compare(path: str | Path, model: nn.Module, batches: Iterable[Any],
            model_input: Callable[[Any], torch.Tensor] = model_input) -> dict[str, float]:
    """Run the file and `model` on the same batches: top-1 agreement (%), logit SQNR of the file against the
    model (dB), the largest absolute logit difference and how many images were compared."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    agree = images = 0
    signal = noise = 0.0
    largest = 0.0
    with evaluating(model), torch.no_grad():
        for batch in batches:
            x = model_input(batch)
            ref = model(x).float().cpu()
            out = torch.from_numpy(sess.run(None, {name: x.cpu().numpy()})[0]).float()
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            images += x.shape[0]
            signal += float(ref.double().pow(2).sum())  # pooled over batches (report/sqnr.py is a floor above)
            noise += float((ref.double() - out.double()).pow(2).sum())
            largest = max(largest, float((ref - out).abs().max()))
    if images == 0:
        raise ValueError("no batches to compare the export on")
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return {"top1_agreement": 100.0 * agree / images, "sqnr_db": sqnr, "max_abs_diff": largest, "images": images}


def structure_problems(path: str | Path) -> tuple[list[str], int]:
    """Compute nodes whose quantized layer is not wholly fed by DequantizeLinear: a MatMul / Gemm / Conv with a
    DequantizeLinear on one of its two operands must have one on the other. Returns the problems and how
    many compute nodes are fully quantized."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    problems, quantized = [], 0
    for node in graph.node:
        if node.op_type not in COMPUTE:
            continue
        fed = [producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input[:2]]
        if all(fed):
            quantized += 1
        elif any(fed):
            side = "activation" if not fed[0] else "weight"
            problems.append(f"{node.op_type} {node.name}: its {side} operand is not fed by a DequantizeLinear")
    return problems, quantized
