"""The requested stages that take a calibrated model towards deployment: `analyze` (which points cost the
accuracy, and the overrides that keep them wider) and `export` (ONNX with Q/DQ pairs, checked by
onnxruntime). Each runs on rank 0 only: neither trains, and their files belong to the run directory."""
from __future__ import annotations

import json
import logging
from typing import Any

import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import move_data_to_device, rank_zero_only

import vitq

from ..export.verify import model_input
from ..files import written_atomically
from ..report.sensitivity import plot_sensitivity, top_lines, write_csv
from .context import RunContext, register_stage

log = logging.getLogger(__name__)


def check_exportable(probe: torch.nn.Module, opset: int) -> None:
    """Before any stage of a `stage=export` run: the grids and bits the recipe places on the architecture must
    be exportable (what calibration decides, the zero points and the integer kernels, is checked at export)."""
    from ..export import ExportError, check_opset, export_problems

    check_opset(opset)
    vitq.set_mode(probe, "quant")
    problems = export_problems(probe, before_calibration=True)
    vitq.set_mode(probe, "off")
    if problems:
        raise ExportError("stage=export cannot export this recipe as Q/DQ ONNX:\n  " + "\n  ".join(problems))


class _Replay(torch.nn.Module):
    """Returns outputs computed already, so a task's evaluation module scores them without a forward."""

    def __init__(self, outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, x: Any) -> torch.Tensor:
        return self.outputs


def _log_figure(ctx: RunContext, key: str, path: Any, metrics: dict[str, float]) -> None:
    for lg in ctx.loggers:
        lg.log_metrics(metrics)
        if isinstance(lg, WandbLogger):
            lg.log_image(key=key, images=[str(path)])


def analysis_batches(ctx: RunContext) -> list[Any]:
    """The images the analysis runs on, held in memory (every configuration passes over them)."""
    a = ctx.run.analyze
    if a.split == "train":
        return list(ctx.task.calib_loader(a.samples, a.batch_size, a.seed))
    return _first_images(ctx.task.test_loader(), a.samples)


@register_stage("analyze")
def analyze_stage(ctx: RunContext) -> None:
    """Per-point sensitivity: sensitivity.csv, sensitivity.png, a printed top list and the overrides that keep
    the most sensitive points wider."""
    if rank_zero_only.rank != 0:
        return
    a, primary = ctx.run.analyze, ctx.task.primary

    def metric(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return ctx.task.eval_module(_Replay(outputs), "analyze").outcomes(batch)[primary].float()

    device = ctx.make_trainer().strategy.root_device  # the trainer's device (a GPU with trainer=gpu)
    batches = [move_data_to_device(b, device) for b in analysis_batches(ctx)]
    ctx.qmodel.to(device), ctx.fp_model.to(device)
    try:
        report = vitq.analyze(ctx.qmodel, batches, forward=lambda m, b: m(model_input(b)), fp_model=ctx.fp_model,
                              metric=metric)
    finally:
        ctx.qmodel.cpu(), ctx.fp_model.cpu()
    csv_path = write_csv(report, ctx.out_dir / "sensitivity.csv")
    title = f"{ctx.run.model['name']} {ctx.recipe.describe()}: logit SQNR recovered by keeping each point float"
    png = plot_sensitivity(report, ctx.out_dir / "sensitivity.png", title)
    recipe = ctx.checkpoint["recipe"] if ctx.checkpoint is not None else ctx.run.quant  # the recipe in force
    existing = list(recipe.get("overrides") or [])  # its own overrides, kept first
    paste = report.hydra_override(a.keep, a.keep_bits, existing=existing, shell=True) if a.keep else ""
    summary = {"analyze/sqnr_all_db": report.totals["all"]["sqnr"],
               "analyze/sqnr_weights_only_db": report.totals["weights_only"]["sqnr"],
               "analyze/sqnr_activations_only_db": report.totals["activations_only"]["sqnr"]}
    with written_atomically(ctx.out_dir / "sensitivity.json") as tmp:
        tmp.write_text(json.dumps({"split": a.split, "samples": sum(len(model_input(b)) for b in batches),
                                   "totals": report.totals, "units": report.units, "keep": a.keep,
                                   "keep_bits": a.keep_bits, "top": report.top(a.keep, narrower_than=a.keep_bits), "override": paste},
                                  indent=1, default=str))
    _log_figure(ctx, "analyze/sensitivity", png, summary)
    print("\n".join(top_lines(report, a.top)))
    for note in report.notes:
        print(f"note: {note}")
    if paste:
        bits = "float" if a.keep_bits is None else f"{a.keep_bits} bits"
        print(f"keep the {a.keep} most sensitive points at {bits}: add\n  {paste}\n"
              f"or apply it to a run with analyze.apply={csv_path}")
    ctx.artifacts["result"] = {"sensitivity": str(csv_path), **summary}


@register_stage("export")
def export_stage(ctx: RunContext) -> None:
    """model.onnx (Q/DQ) and model.fp32.onnx, then onnxruntime against the fake-quant model on the task's
    evaluation images: top-1 agreement, logit SQNR, the Q/DQ structure and the file sizes (export.json)."""
    if rank_zero_only.rank != 0:
        return
    from ..export import compare, export_onnx, structure_problems

    e = ctx.run.export
    batches = _first_images(ctx.task.test_loader(), e.check_samples)  # the check's images; the first is the example
    example = model_input(batches[0])[:1]
    report = export_onnx(ctx.qmodel, ctx.out_dir / "model.onnx", example, opset=e.opset)
    result: dict[str, Any] = {"onnx": str(report.path), "bytes": report.bytes, "qdq_points": len(report.qdq_points),
                              "int8_weights": len(report.int8_weights), "float_points": len(report.float_points)}
    if e.float_export:
        fp = export_onnx(ctx.fp_model, ctx.out_dir / "model.fp32.onnx", example, opset=e.opset)
        result.update(fp32_bytes=fp.bytes, size_ratio=round(report.bytes / fp.bytes, 4))
    result.update(compare(report.path, ctx.qmodel, batches, model_input=model_input))
    problems, quantized = structure_problems(report.path)
    result.update(quantized_compute_nodes=quantized, structure_problems=problems)
    with written_atomically(ctx.out_dir / "export.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    for lg in ctx.loggers:
        lg.log_metrics({f"export/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    size = f", {result['size_ratio']:.2f}x the float file" if "size_ratio" in result else ""
    print(f"exported {report.path} ({report.bytes / 2**20:.2f} MiB{size}): onnxruntime agrees with the fake-quant "
          f"model on {result['top1_agreement']:.2f} % of {result['images']} images (top-1), logit SQNR "
          f"{result['sqnr_db']:.1f} dB; {quantized} MatMul/Gemm/Conv fed by DequantizeLinear on every operand")
    for problem in problems:
        print(f"  not int8: {problem}")
    ctx.artifacts["result"] = result


def _first_images(loader: Any, count: int | None) -> list[Any]:
    """Batches of the loader up to `count` images (all for None), the last one cut to size."""
    if count is None:
        return list(loader)
    batches, seen = [], 0
    for batch in loader:
        x = model_input(batch)
        take = min(len(x), count - seen)
        batches.append([t[:take] if torch.is_tensor(t) else t for t in batch] if isinstance(batch, (tuple, list))
                       else batch[:take])
        seen += take
        if seen >= count:
            break
    return batches
