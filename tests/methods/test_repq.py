"""RepQ-ViT: log-sqrt2 grid, quantile search, and the reparameterization proven against the per-channel model."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import vitq
from vitq.models import norm_pairs
from vitq.quant import iter_points
from vitq.quant.sample_observers import QuantileObserver
from vitq.quant.log_grids import LogSqrt2Quantizer
from vitq.quant.quantizers import UniformQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2)
SWIN = dict(model_name="swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
            embed_dim=24, depths=(2, 2), num_heads=(1, 2), num_classes=10)


# ---------------------------------------------------------------------------------------------------
# the log-sqrt2 grid
# ---------------------------------------------------------------------------------------------------

def test_log_sqrt2_codes_by_hand():
    q = LogSqrt2Quantizer(3)  # codes 0..7
    q.set_range(torch.tensor(0.0), torch.tensor(0.5))  # D = 0.5
    x = torch.tensor([0.6, 0.5, 0.5 / math.sqrt(2), 0.25, 0.5 * 2**-3.5, 0.5 * 2**-3.74, 0.5 * 2**-3.76, 0.0])
    # -2 log2(x / D): -0.53 -> 0 (clamped), 0, 1, 2, 7, 7.48 -> 7, 7.52 -> 8 beyond the grid, inf
    assert q.to_codes(x).tolist() == [0, 0, 1, 2, 7, 7, 8, 8]
    want = [0.5, 0.5, 0.5 / math.sqrt(2), 0.25, 0.5 * 2**-3.5, 0.5 * 2**-3.5, 0.0, 0.0]
    assert torch.allclose(q(x), torch.tensor(want), rtol=1e-6, atol=0)


def test_log_sqrt2_straight_through_gradient():
    x = torch.rand(50).requires_grad_()
    w = torch.randn(50)
    q = LogSqrt2Quantizer(4)
    q.set_range(torch.tensor(0.0), torch.tensor(1.0))
    (q(x) * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_log_sqrt2_only_at_attention_probabilities():
    model = timm.create_model(**VIT).eval()
    with pytest.raises(ValueError, match="log_sqrt2 quantizer stands only at softmax_output"):
        vitq.quantize(model, vitq.recipe("repq", overrides=[{"pattern": "head.input", "quantizer": "log_sqrt2"}]))


# ---------------------------------------------------------------------------------------------------
# quantile search
# ---------------------------------------------------------------------------------------------------

def _search_by_hand(rows: torch.Tensor, quantiles, probe) -> torch.Tensor:
    """RepQ-ViT's search written plainly: per row, the torch.quantile clip pair with the lowest L2 error."""
    best = []
    for row in rows:
        errs = []
        for p in quantiles:
            lo, hi = torch.quantile(row, 1 - p), torch.quantile(row, p)
            probe.set_range(lo, hi)
            errs.append((float((probe(row[None]) - row[None]).pow(2).sum()), float(hi)))
        best.append(min(errs)[1])
    return torch.tensor(best)


def test_quantile_search_picks_the_candidate_with_the_lowest_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 100, 8, generator=g)
    x.view(-1)[::5000] = 60.0  # rare outliers: clipping them wins at 4 bits
    obs = QuantileObserver(quantiles=(0.999, 0.9999, 0.99999, 1.0), max_tokens=64 * 100)  # keep every token
    obs.observe(x)
    lo, hi = obs.range(UniformQuantizer(4))
    want = _search_by_hand(x.reshape(1, -1), obs.quantiles, UniformQuantizer(4))
    assert torch.allclose(hi, want, rtol=1e-5, atol=0)
    assert float(hi) < 10  # the outliers were clipped


def test_quantile_per_channel_search_per_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 384, generator=g)
    w[2, 0], w[4, :3] = 40.0, 9.0
    obs = QuantileObserver(axis=0, channel_axis=0)
    obs.observe(w)
    lo, hi = obs.range(UniformQuantizer(4, axis=0))
    assert hi.shape == (6,)
    want = _search_by_hand(w, obs.quantiles, UniformQuantizer(4))
    assert torch.allclose(hi, want, rtol=1e-5, atol=0)
    assert float(hi[2]) < 40.0  # the interpolated 0.999 quantile clips the single outlier weight


# ---------------------------------------------------------------------------------------------------
# reparameterization
# ---------------------------------------------------------------------------------------------------

def _calibrated(arch: dict, recipe, seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model(**arch).eval()
    g = torch.Generator().manual_seed(1)
    size = arch["img_size"]
    calib = torch.randn(8, 3, size, size, generator=g)
    q = vitq.quantize(model, recipe, inplace=False)
    vitq.calibrate(q, lambda m: m(calib))
    return q, torch.randn(4, 3, size, size, generator=g)


def _consumer_outputs(model, x):
    """Output of every LayerNorm consumer (qkv, fc1, reduction), before anything downstream re-quantizes."""
    out, handles = {}, []
    for pair in norm_pairs(model):
        handles.append(pair.consumer.register_forward_hook(
            lambda m, a, y, name=pair.consumer_name: out.__setitem__(name, y.detach().clone())))
        handles.append(pair.consumer.input_quantizer.register_forward_hook(
            lambda m, a, y, name=pair.consumer_name: out.__setitem__(name + ".codes", m.quantizer.to_codes(a[0]))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("arch", [VIT, SWIN], ids=["vit", "swin"])
def test_reparameterized_model_equals_the_per_channel_model(arch):
    """Weights left float so that only the fold is compared: the per-tensor quantizer after the fold gives
    exactly the per-channel codes, and each consumer's output matches to float rounding (measured max
    |diff| / max |y|: 6.8e-7 on ViT, 3.6e-7 on Swin); the logits, re-quantized downstream, are identical."""
    per_channel, x = _calibrated(arch, vitq.recipe("repq", reparameterize=False, weight=None))
    folded, _ = _calibrated(arch, vitq.recipe("repq", weight=None, fold_zero_point="rounded"))
    pairs = list(norm_pairs(folded))
    assert len(pairs) == (4 if arch is VIT else 9)  # ViT: 2 blocks x 2; Swin: 4 blocks x 2 + 1 merging
    for pair in pairs:
        assert pair.consumer.input_quantizer.quantizer.scale.numel() == 1  # per tensor after the fold
    a, b = _consumer_outputs(per_channel, x), _consumer_outputs(folded, x)
    for pair in pairs:
        name = pair.consumer_name
        ya, yb = a[name], b[name]
        assert (ya - yb).abs().max() <= 1e-6 * ya.abs().max(), name
    with torch.no_grad():
        assert torch.equal(per_channel(x), folded(x))


def test_fold_keeps_codes_bit_exact():
    """z~ rounded, the folded per-tensor codes equal the per-channel codes exactly."""
    per_channel, x = _calibrated(VIT, vitq.recipe("repq", reparameterize=False, weight=None))
    folded, _ = _calibrated(VIT, vitq.recipe("repq", weight=None, fold_zero_point="rounded"))
    a, b = _consumer_outputs(per_channel, x), _consumer_outputs(folded, x)
    for pair in norm_pairs(folded):
        assert torch.equal(a[pair.consumer_name + ".codes"], b[pair.consumer_name + ".codes"]), pair.consumer_name


def test_default_fold_takes_the_codes_unrounded_mean_zero_point():
    """RepQ-ViT's code folds z~ = mean(z) unrounded (test_quant.py:124,142): the folded point's zero point is
    exactly the mean of the per-channel ones, and in float the folded network still computes the float model."""
    per_channel, x = _calibrated(VIT, vitq.recipe("repq", reparameterize=False, weight=None))
    folded, _ = _calibrated(VIT, vitq.recipe("repq", weight=None))
    fractional = 0
    for pair in norm_pairs(folded):
        z = per_channel.get_submodule(pair.consumer_name).input_quantizer.quantizer.zero_point
        z_t = pair.consumer.input_quantizer.quantizer.zero_point
        assert torch.equal(z_t, z.mean().reshape(1)), pair.consumer_name
        fractional += int(z_t.frac().abs().item() > 0)
    assert fractional > 0  # the case the rounded fold differs in
    for method in ("repq", "isvit"):  # refused when the recipe is read, before a model is touched
        with pytest.raises(ValueError, match="fold_zero_point='floor'.*mean.*rounded"):
            vitq.recipe(method, fold_zero_point="floor")


def test_fold_is_float_equivalent_and_refits_weights():
    torch.manual_seed(0)
    model = timm.create_model(**VIT).eval()
    q, x = _calibrated(VIT, vitq.recipe("repq"))
    vitq.set_mode(q, "off")  # the folded float network computes the float model
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-5, rtol=1e-4)
    vitq.set_mode(q, "quant")
    # every consumer's weight grid is the one a fresh calibration of its folded weight gives (RepQ-ViT's
    # `weight_quantizer.inited = False` before the re-calibration forward), not the pre-fold grid
    for pair in norm_pairs(q):
        layer, before = q.get_submodule(pair.consumer_name), model.get_submodule(pair.consumer_name)
        fresh = {}
        for name, weight in (("folded", layer.weight), ("original", before.weight)):
            obs = QuantileObserver(axis=0, channel_axis=0)
            obs.observe(weight.detach())
            grid = UniformQuantizer(4, symmetric=False, axis=0)
            grid.set_range(*obs.range(grid))
            fresh[name] = grid.scale
        assert torch.equal(layer.weight_quantizer.quantizer.scale, fresh["folded"]), pair.consumer_name
        assert not torch.equal(fresh["folded"], fresh["original"]), pair.consumer_name  # the fold changed them


@pytest.mark.parametrize("reparameterize", [True, False], ids=["folded", "per-channel"])
@pytest.mark.parametrize("arch", [VIT, SWIN], ids=["vit", "swin"])
def test_repq_checkpoint_round_trip_is_bit_identical(arch, reparameterize, tmp_path):
    q, x = _calibrated(arch, vitq.recipe("repq", reparameterize=reparameterize))
    path = vitq.save_quantized(q, tmp_path / "repq.ckpt")
    torch.manual_seed(5)
    fresh = vitq.load_quantized(timm.create_model(**arch).eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    rows = {r["name"]: r for r in vitq.summary(fresh)}
    for pair in norm_pairs(fresh):  # the layout the method left is the layout that reloads
        want = "per_tensor" if reparameterize else "per_channel"
        assert rows[f"{pair.consumer_name}.input"]["granularity"] == want
    fresh(x.requires_grad_()).sum().backward()  # the training path accepts the reloaded layout too
    assert x.grad is not None
    if arch is SWIN and reparameterize:  # the bias the fold added to the bias-free reduction layer came back
        assert fresh.layers[1].downsample.reduction.bias is not None


def test_repq_recipe_matches_the_paper_protocol():
    r = vitq.recipe("repq")
    assert r.scope == "matmul" and r.method == "repq"
    assert (r.specs["weight"].bits, r.specs["linear_input"].bits, r.specs["softmax_output"].bits) == (4, 4, 4)
    assert r.specs["weight"].observer == "quantile" and r.specs["weight"].per_channel
    assert r.specs["softmax_output"].quantizer == "log_sqrt2"
    assert r.calib_flow == "quantized"  # one forward with quantization on (test_quant.py:91-93)
    assert not r.specs["weight"].zero_in_range and not r.specs["linear_input"].zero_in_range  # [min, max] as is
    q, _ = _calibrated(VIT, r)
    points = dict(iter_points(q))
    assert points["patch_embed.proj.input"].quantizer.bits == 8  # the image input stays 8-bit
    assert points["head.input"].quantizer.bits == 4  # the head is quantized
    from vitq.engine.config import quant_schema  # noqa: F401  (the Hydra group composes the same file)


def test_log_sqrt2_inference_path_equals_codes_round_trip():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 3, 50, 50, generator=g) * 3, dim=-1)
    p[0, 0, 0, :5] = 0.0
    q = LogSqrt2Quantizer(4)
    q.set_range(torch.tensor(0.0), torch.tensor(0.6))
    with torch.no_grad():
        assert torch.equal(q(p), q.from_codes(q.to_codes(p)))
