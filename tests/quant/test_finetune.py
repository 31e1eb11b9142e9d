"""What finetuning trains: LSQ steps, LSQ+ zero points on asymmetric grids, optionally weights; and back."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitq
from vitq.quant.finetune import QuantTraining, learnable_grids
from vitq.quant.quantizers import UniformQuantizer

VIT = dict(model_name="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
           num_classes=5)


def _calibrated(recipe: str = "minmax", bits: int = 4):
    torch.manual_seed(0)
    fp = timm.create_model(**VIT).eval()
    data = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    q = vitq.quantize(copy.deepcopy(fp), vitq.recipe(recipe, w_bits=bits, a_bits=bits))
    vitq.calibrate(q, lambda m: [m(b) for b in data[:64].split(16)], sync=False)
    return fp, q, data[:64], data[64:]


def test_learnable_zero_point_gets_the_lsq_plus_gradient_and_stays_on_the_integer_grid():
    grid = UniformQuantizer(4, symmetric=False)
    grid.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    zp0 = float(grid.zero_point)
    scale, zp = grid.make_learnable(zero_point=True)
    x = torch.linspace(-3, 5, 101)  # values beyond both ends: the clipped ones carry the offset's gradient
    grid(x).pow(2).sum().backward()
    assert zp.grad is not None and float(zp.grad.abs()) > 0 and float(scale.grad.abs().sum()) > 0
    with torch.no_grad():
        zp.add_(0.4)  # an off-grid value is used rounded in the forward pass ...
    y_learn = grid(x).detach()
    grid.make_fixed()
    assert not isinstance(grid.zero_point, torch.nn.Parameter) and not grid.learnable
    assert float(grid.zero_point) == round(zp0 + 0.4)  # ... and stored rounded
    assert torch.equal(grid(x), y_learn)


def test_symmetric_grids_learn_no_zero_point():
    grid = UniformQuantizer(4, symmetric=True)
    grid.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    assert len(grid.make_learnable(zero_point=True)) == 1


def test_quant_training_trains_steps_and_zero_points_and_leaves_everything_as_it_was():
    _, q, calib, _ = _calibrated()
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    before = {k: v.clone() for k, v in q.state_dict().items()}
    training = QuantTraining(q, weights=False)
    t = training.trainables
    grids = training.grids
    assert len(t.steps) == len(grids) > 0
    assert len(t.zero_points) == sum(not g.symmetric for g in grids) > 0  # activations are asymmetric here
    assert not t.weights and all(not p.requires_grad for n, p in q.named_parameters() if "quantizer" not in n)
    q(calib[:8]).sum().backward()
    assert all(p.grad is not None for p in t.steps + t.zero_points)
    training.finish()
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags
    after = q.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not learnable_grids(q)[0].learnable


def test_training_with_weights_lowers_the_distillation_error_on_held_out_inputs():
    """Adam on steps, zero points and weights against the float outputs: the error on inputs it never saw
    falls by more than half."""
    fp, q, calib, held_out = _calibrated(bits=3)

    def error(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((q(x) - fp(x)).pow(2).mean())

    start = error(held_out)
    training = QuantTraining(q, weights=True)
    t = training.trainables
    opt = torch.optim.Adam([{"params": t.steps + t.zero_points, "lr": 1e-3}, {"params": t.weights, "lr": 1e-3}])
    for step in range(60):
        x = calib[(step * 16) % 64:][:16]
        loss = (q(x) - fp(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    training.finish()
    assert error(held_out) < 0.5 * start  # measured: 0.32 of the start


def test_a_recipe_without_uniform_grids_and_frozen_weights_trains_nothing():
    _, q, _, _ = _calibrated()
    for grid in learnable_grids(q):
        grid.__class__ = type("OtherGrid", (UniformQuantizer,), {})  # not plain uniform: keeps its own rule
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    with pytest.raises(ValueError, match="quant.finetune.weights=true"):
        QuantTraining(q, weights=False)
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags
