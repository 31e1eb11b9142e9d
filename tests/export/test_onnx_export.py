"""The Q/DQ ONNX export, checked by onnxruntime (an independent implementation of QuantizeLinear /
DequantizeLinear) against hand-worked values and against the fake-quant model."""
from __future__ import annotations

import copy
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import vitq
from vitq.export import ExportError, compare, export_onnx, session, structure_problems
from vitq.export.qdq import Dequant, QDQParams, QuantDequant

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from small_vit import calibrated, model_and_inputs  # noqa: E402

LINEAR_LAYERS = 2 * 4 + 2  # two blocks (qkv, proj, fc1, fc2), the patch embedding and the head


def run_module(module: torch.nn.Module, x: torch.Tensor, optimize: bool, tmp_path: Path) -> np.ndarray:
    path = tmp_path / f"m{int(optimize)}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"])
    return session(path, optimize=optimize).run(None, {"input": x.numpy()})[0]


class OnePoint(torch.nn.Module):
    def __init__(self, params: QDQParams) -> None:
        super().__init__()
        self.params = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantDequant.apply(x, self.params)


@pytest.mark.parametrize("optimize", [False, True])
def test_a_narrow_grid_quantizes_as_worked_by_hand(tmp_path, optimize):
    # 4-bit unsigned, step 0.5, zero point 3: codes clamp(round(x / 0.5) + 3, 0, 15), values (code - 3) * 0.5
    p = QDQParams(torch.tensor(0.5), torch.tensor(3, dtype=torch.uint8), 0, 15)
    # 0.25 / 0.5 and 0.75 / 0.5 are ties: half to even gives codes 0 + 3 and 2 + 3
    x = torch.tensor([[-2.0, -1.4, 0.26, 6.1, 100.0, 0.25, 0.75]])
    expected = [[-1.5, -1.5, 0.5, 6.0, 6.0, 0.0, 1.0]]
    assert run_module(OnePoint(p), x, optimize, tmp_path).tolist() == expected
    assert OnePoint(p)(x).tolist() == expected  # the traced forward agrees


def test_a_per_channel_grid_and_a_weight_as_worked_by_hand(tmp_path):
    # 4-bit signed per channel (axis 1): steps 0.5 and 0.25, codes in [-8, 7]
    p = QDQParams(torch.tensor([0.5, 0.25]), torch.tensor([0, 0], dtype=torch.int8), -8, 7, axis=1)
    x = torch.tensor([[3.3, 3.3], [-9.0, 0.3]])
    assert run_module(OnePoint(p), x, False, tmp_path).tolist() == [[3.5, 1.75], [-4.0, 0.25]]

    codes = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
    rows = QDQParams(torch.tensor([0.5, 0.25]), torch.tensor([0, 0], dtype=torch.int8), -128, 127, axis=0)

    class Weight(torch.nn.Module):  # grids and codes made before tracing, as the exporter makes them
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ Dequant.apply(codes, rows)

    out = run_module(Weight(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), False, tmp_path)
    assert out.tolist() == [[0.5, -1.0], [0.75, 1.0]]  # rows scaled by 0.5 and 0.25


@pytest.fixture(scope="module")
def vit():
    return model_and_inputs(64)


@pytest.mark.parametrize("name,kwargs,weights", [
    ("minmax", {}, LINEAR_LAYERS), ("int8_trt", {}, LINEAR_LAYERS), ("minmax", {"w_bits": 4, "a_bits": 4}, LINEAR_LAYERS),
    ("noisyquant", {"noisy_candidates": 20, "noisy_clip_candidates": 20}, LINEAR_LAYERS - 2),  # the patch embedding and the head stay float, as its code leaves them
])
def test_onnxruntime_agrees_with_the_fake_quant_model(vit, tmp_path, name, kwargs, weights):
    model, x = vit
    q = calibrated(model, vitq.recipe(name, **kwargs), x)
    before = q(x[:4])
    report = export_onnx(q, tmp_path / "m.onnx", x[:1])
    assert torch.equal(q(x[:4]), before)  # the model's own forwards are back
    assert not any("forward" in vars(m) for m in q.modules())
    check = compare(report.path, q, [x[:32], x[32:]])
    assert check["images"] == 64 and check["top1_agreement"] == 100.0
    assert check["sqnr_db"] > 40  # a wrong zero point or step is far below (see the break test)
    assert len(report.int8_weights) == weights
    out = session(report.path).run(None, {"input": x[:5].numpy()})[0]  # any batch size
    assert out.shape == (5, 10)


def test_a_wrong_zero_point_is_caught(vit, tmp_path, monkeypatch):
    """The agreement test's bound fails when the export writes a grid wrongly."""
    from vitq.export import onnx_model

    model, x = vit
    q = calibrated(model, vitq.recipe("minmax"), x)
    real = onnx_model.qdq_params

    def shifted(point, rank=None):  # noqa: ANN001, ANN202
        p = real(point, rank)
        return p if p.zero_point.dtype == torch.int8 else QDQParams(p.scale, p.zero_point // 2, p.qmin, p.qmax,
                                                                   p.axis, p.noise)

    monkeypatch.setattr(onnx_model, "qdq_params", shifted)
    report = export_onnx(q, tmp_path / "m.onnx", x[:1])
    assert compare(report.path, q, [x])["sqnr_db"] < 20


def test_the_tensorrt_preset_is_int8_on_every_linear_layer(vit, tmp_path):
    model, x = vit
    q = calibrated(model, vitq.recipe("int8_trt"), x)
    report = export_onnx(q, tmp_path / "q.onnx", x[:1])
    fp = export_onnx(model, tmp_path / "fp.onnx", x[:1])
    problems, quantized = structure_problems(report.path)
    assert problems == [] and quantized == LINEAR_LAYERS
    graph = onnx.load(str(report.path)).graph
    tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute)]
    int8 = [t for t in tensors if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) == LINEAR_LAYERS  # weights stored as codes
    kinds = {n.op_type for n in graph.node}
    assert "LayerNormalization" in kinds and "Softmax" in kinds and "Clip" not in kinds  # 8 bits: no clip
    assert report.bytes < 0.5 * fp.bytes
    assert structure_problems(fp.path) == ([], 0)


def test_a_quantized_input_without_its_dequantize_is_named(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("DequantizeLinear", ["w8", "s", "z"], ["w"]),
         onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(np.ones((2, 2), np.int8), "w8"), onnx.numpy_helper.from_array(np.float32(1), "s"),
         onnx.numpy_helper.from_array(np.int8(0), "z")])
    path = tmp_path / "g.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    assert structure_problems(path) == (["MatMul mm: its activation operand is not fed by a DequantizeLinear"], 0)


@pytest.mark.parametrize("make,expected", [
    (lambda m, x: vitq.quantize(copy.deepcopy(m), "minmax"), "never calibrated"),
    (lambda m, x: calibrated(m, vitq.recipe("fqvit"), x), "make it uniform with quant.lis=false"),  # its switch
    (lambda m, x: calibrated(m, vitq.recipe("repq"), x), "make it uniform with quant.softmax_output.quantizer=uniform"),
    (lambda m, x: calibrated(m, vitq.recipe("fqvit"), x), "quant.integer=false"),
    (lambda m, x: calibrated(m, vitq.recipe("minmax", a_bits=12), x), "more than 8 bits"),
    (lambda m, x: calibrated(m, vitq.recipe("minmax", overrides=[{"pattern": "blocks.0.attn.matmul_qk.b",
                                                                  "per_channel": True}]), x),
     "blocks.0.attn.matmul_qk.b"),
])
def test_what_cannot_be_exported_is_named_and_nothing_is_written(vit, tmp_path, make, expected):
    model, x = vit
    with pytest.raises(ExportError, match=re.escape(expected)):
        export_onnx(make(model, x), tmp_path / "m.onnx", x[:1])
    assert list(tmp_path.iterdir()) == []


def test_an_old_opset_is_refused(vit, tmp_path):
    model, x = vit
    with pytest.raises(ExportError, match="opset 11 is too old"):
        export_onnx(calibrated(model, vitq.recipe("minmax"), x), tmp_path / "m.onnx", x[:1], opset=11)
    assert list(tmp_path.iterdir()) == []


def test_ptf_layernorm_inputs_export_per_channel(vit, tmp_path):
    """FQ-ViT's PTF grid (with its log2 softmax and integer kernels off) is a per-channel Q/DQ pair at every
    LayerNorm input: two per block and the final norm."""
    model, x = vit
    q = calibrated(model, vitq.recipe("fqvit", lis=False, integer=False, attn_bits=8), x)
    report = export_onnx(q, tmp_path / "m.onnx", x[:1])
    graph = onnx.load(str(report.path)).graph
    per_channel = [n for n in graph.node if n.op_type == "QuantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(per_channel) == 2 * 2 + 1
    check = compare(report.path, q, [x])
    # scope full requantizes every tensor: codes at exact ties (x / s in ONNX, x * (1 / s) in the simulation)
    # flip and propagate (docs/deploy.md); a wrong axis or scale gives a few dB
    assert check["top1_agreement"] == 100.0 and check["sqnr_db"] > 20


def test_the_forwards_come_back_when_the_exporter_fails(vit, tmp_path, monkeypatch):
    model, x = vit
    q = calibrated(model, vitq.recipe("minmax"), x)
    before = q(x[:4])

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(q, tmp_path / "m.onnx", x[:1])
    assert not any("forward" in vars(m) for m in q.modules()) and torch.equal(q(x[:4]), before)
    assert list(tmp_path.iterdir()) == []
