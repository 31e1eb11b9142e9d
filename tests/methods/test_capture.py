"""Cached layer inputs (vitq.methods.capture) for modules with non-tensor positional arguments, as mmdet
Swin's blocks and window attention take `(x, hw_shape)`."""
from __future__ import annotations

import torch
from torch import nn

from vitq.methods import capture


class WithShape(nn.Module):
    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        h, w = hw_shape
        assert x.shape[1] == h * w
        return x.view(x.shape[0], h, w, -1).flip(1).reshape_as(x)


def test_positional_non_tensor_arguments_are_kept_and_other_shapes_are_skipped(monkeypatch):
    monkeypatch.setattr(capture, "_observing", lambda module: True)
    m = WithShape()
    capture.attach([m], 5, "t", keep_output=True)
    a, b, c = torch.randn(2, 6, 4), torch.randn(2, 8, 4), torch.randn(3, 6, 4)
    outs = [m(a, (2, 3)), m(b, (2, 4)), m(c, (2, 3))]  # the middle call has another image size
    cap = capture.captured(m, "t", "test")
    assert cap.rows == 5 and cap.call_args[1] == (2, 3)
    assert torch.equal(cap.args[0], torch.cat([a, c]))
    assert torch.equal(m(*cap.call_args, **cap.kwargs), torch.cat([outs[0], outs[2]]))
    assert torch.equal(cap.output, torch.cat([outs[0], outs[2]]))
    capture.detach_all(m, "t")


class Scaled(nn.Module):
    def forward(self, x: torch.Tensor, *, gain: torch.Tensor) -> torch.Tensor:
        return x * gain


def test_keyword_tensors_are_kept_per_call_inputs_are_float32_and_remap_maps_every_row(monkeypatch):
    monkeypatch.setattr(capture, "_observing", lambda module: True)
    m = Scaled()
    capture.attach([m], 4, "t", max_tokens=10)  # 2 rows x 3 positions per call: full after two calls
    xs = [torch.arange(6, dtype=torch.float16).view(2, 3, 1) + 10 * i for i in range(3)]
    gains = [torch.full((2, 1, 1), float(i + 1)) for i in range(3)]
    for x, g in zip(xs, gains):
        m(x, gain=g)
    cap = capture.captured(m, "t", "test")
    assert cap.rows == 4 and cap.args[0].dtype == torch.float32  # the third call came after 12 >= 10 tokens
    assert torch.equal(cap.kwargs["gain"], torch.cat(gains[:2]))  # each call's own keyword tensor, not the first's
    assert torch.equal(m(*cap.call_args, **cap.kwargs), torch.cat([xs[0].float() * 1, xs[1].float() * 2]))
    capture.remap_inputs(m, lambda t: t + 0.5)
    assert torch.equal(cap.args[0], torch.cat(xs[:2]).float() + 0.5)
    capture.detach_all(m, "t")
    assert "_vitq_capture" not in m.__dict__


def test_replayed_input_records_every_batch_outside_calibration_and_leaves_no_hook():
    """A replay runs the model in its quantized state (no point observes): the record is taken anyway, over
    every batch the loop feeds, and nothing stays attached afterwards."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    batches = [torch.randn(2, 4), torch.randn(5, 4)]
    seen = capture.replayed_input(model, model[2], lambda m: [m(b) for b in batches], "t", "model.2")
    torch.testing.assert_close(seen, torch.relu(model[0](torch.cat(batches))))
    assert not model[2]._forward_hooks and capture._KEY not in model[2].__dict__
