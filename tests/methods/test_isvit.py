"""I&S-ViT: the SULQ grid (2^b levels, the shift search), SOS's passes and its exact fold, and QDrop's
recipe; the engine runs both through the `reconstruct` stage."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitq
from vitq.methods.isvit import ETAS, SULQObserver, SULQuantizer, fold
from vitq.models import norm_pairs
from vitq.quant.quantizers import UniformQuantizer

VIT = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
           num_classes=10)


def _probabilities(n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n // 64, 64, generator=g) * 3).softmax(-1).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# SULQ
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4])
def test_sulq_has_exactly_two_to_the_b_levels(bits):
    grid = SULQuantizer(bits)
    grid.set_eta_range(0.01, torch.tensor(0.0), torch.tensor(1.0))
    x = torch.linspace(0, 1, 200001)
    codes = grid.to_codes(x)
    assert torch.equal(codes.unique(), torch.arange(2**bits, dtype=codes.dtype))  # 0 .. 2^b - 1, all used
    # the range ends map to the end codes: x = 1 to 0, x = 0 to 2^b - 1 (the published forward's /2^b
    # step would reach code 2^b, a (2^b + 1)-th level)
    assert codes[-1] == 0 and codes[0] == 2**bits - 1
    assert grid(x).unique().numel() <= 2**bits
    # dequantized values are powers of two minus eta (integer exponents: bit shifts)
    exps = torch.log2(grid.from_codes(codes.unique()) + 0.01)
    assert torch.allclose(exps, exps.round(), atol=1e-5)


def test_sulq_codes_by_hand():
    grid = SULQuantizer(3)
    grid.set_eta_range(0.5, torch.tensor(0.0), torch.tensor(1.0))
    # y = -log2(x + 0.5) spans [-log2 1.5, 1]; step = (1 + log2 1.5) / 7
    lo, step = -torch.log2(torch.tensor(1.5)), (1 + torch.log2(torch.tensor(1.5))) / 7
    assert torch.allclose(grid.lo, lo.reshape(1)) and torch.allclose(grid.step, step.reshape(1))
    # worked by hand: lo = -0.584963, step = 0.226423. x = 0: y = 1, (1 + 0.584963) / step = 7 -> code 7,
    # lo + 7 step = 1, 2^round(-1) - 0.5 = 0. x = 0.25: y = 0.415037, 1.0 / step = 4.42 -> code 4,
    # lo + 4 step = 0.320729, 2^round(-0.32) - 0.5 = 0.5. x = 1: y = lo -> code 0, 2^round(0.584963) - 0.5 = 1.5.
    x = torch.tensor([0.0, 0.25, 1.0])
    assert grid.to_codes(x).tolist() == [7.0, 4.0, 0.0]
    assert grid(x).tolist() == [0.0, 0.5, 1.5]


def test_sulq_straight_through_gradient():
    grid = SULQuantizer(4)
    grid.set_eta_range(0.01, torch.tensor(0.0), torch.tensor(1.0))
    x = _probabilities(256).requires_grad_(True)
    grid(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_eta_search_picks_the_candidate_with_the_lowest_l2_error():
    x = _probabilities()
    obs = SULQObserver()
    for part in x.split(1024):
        obs.observe(part.reshape(16, 64))
    grid = SULQuantizer(3)
    errors = obs.errors(grid)
    assert len(errors) == len(ETAS) == 11
    obs.fit(grid)
    # brute force over the published grid with fresh quantizers, on the same sample
    sample = obs.state["sample"].reshape(-1)
    brute = []
    for eta in ETAS:
        g = SULQuantizer(3)
        g.set_eta_range(eta, x.min(), x.max())
        brute.append(float((g(sample) - sample).pow(2).sum()))
    best = min(range(len(brute)), key=brute.__getitem__)
    assert errors == pytest.approx(brute, rel=1e-6)
    assert float(grid.eta) == pytest.approx(ETAS[best])
    assert len(set(round(e, 12) for e in brute)) > 1  # the candidates really differ
    assert brute[best] < max(brute)


def test_sulq_observer_merges_like_one_observer():
    x = _probabilities()
    one, a, b = SULQObserver(), SULQObserver(), SULQObserver()
    one.observe(x.reshape(64, 64))
    a.observe(x[:2048].reshape(32, 64))
    b.observe(x[2048:].reshape(32, 64))
    a.merge_(b)
    assert torch.equal(a.state["min"], one.state["min"]) and torch.equal(a.state["max"], one.state["max"])


# ---------------------------------------------------------------------------------------------------
# SOS
# ---------------------------------------------------------------------------------------------------

def _calibrated(recipe):
    torch.manual_seed(0)
    fp = timm.create_model(**VIT).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=g)
    q = vitq.quantize(copy.deepcopy(fp), recipe)
    vitq.calibrate(q, lambda m: [m(b) for b in x.split(32)])
    return fp, q, x


def test_isvit_recipe_places_sulq_and_per_channel_post_layernorm_inputs():
    fp, q, _ = _calibrated(vitq.recipe("isvit", w_bits=4, a_bits=4))
    assert isinstance(q.blocks[0].attn.softmax.output_quantizer.quantizer, SULQuantizer)
    for pair in norm_pairs(q):
        assert pair.consumer.input_quantizer.quantizer.scale.numel() == pair.consumer.in_features
    assert q.blocks[0].attn.proj.input_quantizer.quantizer.scale.numel() == 1
    ablation = vitq.recipe("isvit", sulq=False, sos=False)
    _, plain, _ = _calibrated(ablation)
    assert type(plain.blocks[0].attn.softmax.output_quantizer.quantizer) is UniformQuantizer
    assert all(p.consumer.input_quantizer.quantizer.scale.numel() == 1 for p in norm_pairs(plain))


def test_sos_passes_follow_the_paper():
    method = vitq.recipe("isvit").method_impl()
    _, q, _ = _calibrated(vitq.recipe("isvit", w_bits=4, a_bits=4))
    first, third = method.reconstruct_passes(q)
    assert (first.input_source, third.input_source) == ("float", "quant")
    assert first.tune_weights and third.tune_weights and not (first.adaround or first.lsq)
    assert (first.iters, first.batch_size, first.lr, first.weight_decay) == (1000, 64, 4e-5, 0.0)
    _, q6, _ = _calibrated(vitq.recipe("isvit", w_bits=6, a_bits=6))
    assert method.reconstruct_passes(q6)[0].iters == 200
    no_sos = vitq.recipe("isvit", sos=False).method_impl().reconstruct_passes(q)
    assert [p.input_source for p in no_sos] == ["quant"]


def test_stage_two_fold_is_lossless(tmp_path):
    """Weights float (as in SOS stage 1): folding the per-channel post-LayerNorm grids into the LayerNorm
    and the next layer leaves the consumers' input codes as they were (measured: 1 of 52,224 codes of
    blocks.1.mlp.fc1 moved by one step, at a rounding tie; every other code identical) and the logits
    equal (measured: identical; bound 1e-4 of the largest logit)."""
    fp, q, x = _calibrated(vitq.recipe("isvit", w_bits=4, a_bits=4))
    method = q.vitq.recipe.method_impl()
    method.before_pass(q, 0)  # stage 1: weight grids off
    assert all(p.mode == "off" for _, p in vitq.iter_points(q) if p.kind == vitq.Kind.WEIGHT)
    codes_before = _consumer_codes(q, x)
    with torch.no_grad():
        before = q(x)
    assert fold(q) == 4
    codes_after = _consumer_codes(q, x)
    with torch.no_grad():
        after = q(x)
    # the first block's consumers see exactly the same codes; downstream, float rounding of the folded
    # weights (about 1e-7) can flip a code that sits on a rounding tie by one step
    assert torch.equal(codes_before["blocks.0.attn.qkv"], codes_after["blocks.0.attn.qkv"])
    for name in codes_before:
        diff = (codes_before[name] - codes_after[name]).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4, (name, int((diff > 0).sum()))
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    for pair in norm_pairs(q):
        assert pair.consumer.input_quantizer.quantizer.scale.numel() == 1
    saved = vitq.save_quantized(q, tmp_path / "q.ckpt")  # the recipe now records per-tensor post-LayerNorm inputs
    assert saved is not None and all(not q.vitq.recipe.resolve(f"{p.consumer_name}.input", "linear_input").per_channel
                                     for p in norm_pairs(q))


def _consumer_codes(model, x):
    out, handles = {}, []
    for pair in norm_pairs(model):
        handles.append(pair.consumer.input_quantizer.register_forward_hook(
            lambda m, a, y, name=pair.consumer_name: out.__setitem__(name, m.quantizer.to_codes(a[0]))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def test_before_stage_three_weights_are_quantized_on_refitted_grids():
    fp, q, x = _calibrated(vitq.recipe("isvit", w_bits=4, a_bits=4))
    method = q.vitq.recipe.method_impl()
    method.before_pass(q, 0)
    untuned = q.blocks[0].mlp.fc2.weight_quantizer.quantizer.scale.clone()
    with torch.no_grad():
        q.blocks[0].mlp.fc2.weight.mul_(3.0)  # as if stage 1 had moved the weights
    method.before_pass(q, 1)
    fc2 = q.blocks[0].mlp.fc2
    assert fc2.weight_quantizer.mode == "quant"
    # the grid is what a fresh calibration of the tuned weight gives (the weight search, nine clips), 3x
    # the steps the untuned weight had
    from vitq.quant.observers import make_observer

    spec = q.vitq.recipe.specs[vitq.Kind.WEIGHT]
    obs = make_observer(spec.observer, axis=0, channel_axis=0, **spec.observer_args)
    obs.observe(fc2.weight.detach())
    fresh = UniformQuantizer(4, symmetric=False, axis=0)
    fresh.set_range(*obs.range(fresh))
    assert torch.equal(fc2.weight_quantizer.quantizer.scale, fresh.scale)
    assert not torch.equal(fresh.scale, untuned)  # so the grid of the untuned weight would not pass


def test_qdrop_recipe_and_pass():
    r = vitq.recipe("qdrop", w_bits=4, a_bits=4)
    assert r.describe() == "W4/A4 matmul"
    weight = r.specs[vitq.Kind.WEIGHT]  # every published QDrop config: asymmetric per-channel weights
    assert (weight.symmetric, weight.per_channel, weight.observer) == (False, True, "omse")
    (p,) = r.method_impl().reconstruct_passes(None)
    assert p.adaround and p.lsq and p.drop_prob == 0.5 and p.input_source == "mix" and p.mix_prob == 0.5
    assert (p.iters, p.batch_size, p.adaround_lr, p.lsq_lr, p.reg_weight, p.beta, p.warmup) == \
        (20000, 32, 1e-3, 4e-5, 0.01, (20.0, 2.0), 0.2)
    with pytest.raises(ValueError, match="keep_prob"):
        vitq.recipe("qdrop", keep_prob=0.0).method_impl().reconstruct_passes(None)


def test_weight_clips_come_from_the_codes_nine_candidates():
    """IaS-ViT's `quantizer.py` searches nine quantile clips for weights (0.97 ... 0.99999) and three for
    activations (0.999, 0.9999, 0.99999). For Laplace-distributed weights at 3 bits the L2-best clip lies
    near the 0.97 quantile (about 2.8 scale units), far inside the 0.999 quantile (about 6.2), so the nine
    candidates reach a clip that the three cannot."""
    from vitq.quant import Kind
    from vitq.quant.observers import make_observer

    specs = vitq.recipe("isvit").specs
    nine = [0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999]
    assert specs[Kind.WEIGHT].observer_args["quantiles"] == nine
    assert specs[Kind.LINEAR_INPUT].observer == "quantile" and not specs[Kind.LINEAR_INPUT].observer_args
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((2, 4000))
    his = {}
    for name, args in (("nine", specs[Kind.WEIGHT].observer_args), ("three", {})):
        obs = make_observer("quantile", axis=0, channel_axis=0, **args)
        obs.observe(w)
        his[name] = obs.range(UniformQuantizer(bits=3, symmetric=False, axis=0))[1]
    for c in range(2):  # each channel's clip is one of the nine quantiles, a low one
        candidates = torch.quantile(w[c], torch.tensor(nine))
        k = int((candidates - his["nine"][c]).abs().argmin())
        assert abs(float(candidates[k] - his["nine"][c])) < 1e-4 and nine[k] <= 0.99, (k, his)
        assert float(his["three"][c]) >= float(torch.quantile(w[c], 0.999)) - 1e-4


def test_image_input_is_not_quantized_as_the_codes_quantconv2d():
    """I&S-ViT's QuantConv2d has no input quantizer (quant/quant_modules.py:36,54); RepQ-ViT's quantizes
    the image at 8 bits."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    isvit = dict(vitq.iter_points(vitq.quantize(model, vitq.recipe("isvit"), inplace=False)))
    repq = dict(vitq.iter_points(vitq.quantize(model, vitq.recipe("repq"), inplace=False)))
    assert not isvit["patch_embed.proj.input"].configured and isvit["patch_embed.proj.weight"].configured
    assert repq["patch_embed.proj.input"].configured and repq["patch_embed.proj.input"].spec.bits == 8
