"""NoisyQuant: the folded layer equals the unfolded computation, zero noise is the base quantizer exactly,
the error drops where the analysis says it must, and the add-on stacks on other recipes and reloads."""
from __future__ import annotations

import copy

import pytest
import torch

import vitq
from vitq.engine.config import quant_schema
from vitq.methods import ADDONS, METHODS, build_method
from vitq.methods.base import WithAddons
from vitq.methods.noisyquant import (NoisyGrid, add_noise, base_noise, layer_output, noisy_layers,
                                    quantized_weight_output, refold, search_amplitude, search_clip)
from vitq.quant.modules import QuantLinear
from vitq.quant.quantizers import UniformQuantizer

from small_vit import calibrated, model_and_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(noisy_candidates=11, noisy_clip_candidates=10, noisy_samples=512)


@pytest.fixture(scope="module")
def data():
    return model_and_inputs(48)


# ---------------------------------------------------------------------------------------------------
# the add-on mechanism
# ---------------------------------------------------------------------------------------------------

def test_noisy_switch_exists_for_every_method_and_in_the_config_schema():
    assert "noisyquant" in ADDONS
    for name, cls in METHODS.items():
        assert "noisy" in cls.option_names(), name
        assert "noisy" in {f for f in quant_schema(name).__dataclass_fields__}
    assert not isinstance(build_method("repq", {}), WithAddons)
    both = build_method("repq", {"noisy": True})
    assert isinstance(both, WithAddons) and both.name == "repq" and both.options.reparameterize


def test_noisy_needs_uniform_quantized_linear_inputs():
    with pytest.raises(ValueError, match="leaves linear inputs float"):
        vitq.recipe("fp32", noisy=True)
    with pytest.raises(ValueError, match="needs a uniform grid at linear inputs"):
        vitq.recipe("minmax", noisy=True, activation={"quantizer": "ptf"})
    with pytest.raises(ValueError, match="noisy_range"):
        vitq.recipe("minmax", noisy=True, noisy_range=0.0)


# ---------------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------------

def test_folded_layer_equals_the_unfolded_computation(data):
    model, x = data
    q = calibrated(model, vitq.recipe("minmax", noisy=True, w_bits=6, a_bits=6, **FAST), x)
    ref = dict(model.named_modules())
    checked = 0
    for name, layer in noisy_layers(q):
        grid = layer.input_quantizer.quantizer
        assert isinstance(grid, NoisyGrid)
        noise = grid.noise
        inp = torch.randn(4, 17, layer.in_features) * 2
        wq = layer.weight_quantizer(layer.weight)
        # unfolded: quantize X + N, multiply, subtract q(W) N, add the float layer's own bias
        unfolded = grid.inner(inp + noise) @ wq.t() - noise @ wq.t() + ref[name].bias
        with torch.no_grad():
            folded = layer(inp)
        torch.testing.assert_close(folded, unfolded, rtol=0, atol=1e-5)
        checked += noise.abs().max() > 0
    assert checked >= 1  # at least one layer carries noise (else the comparison is the plain layer)


def test_changed_weights_are_folded_again_after_reconstruction(data):
    model, x = data
    q = calibrated(model, vitq.recipe("minmax", noisy=True, w_bits=6, a_bits=6, **FAST), x)
    name, layer = next((n, m) for n, m in noisy_layers(q) if m.input_quantizer.quantizer.noise.abs().max() > 0)
    bias = dict(model.named_modules())[name].bias.detach()
    with torch.no_grad():
        layer.weight.mul_(1.3)  # what a reconstruction pass does: new weights
    q.vitq.recipe.method_impl().after_reconstruct(q)
    grid = layer.input_quantizer.quantizer
    inp = torch.randn(3, 5, layer.in_features)
    wq = layer.weight_quantizer(layer.weight)
    with torch.no_grad():
        torch.testing.assert_close(layer(inp), grid.inner(inp + grid.noise) @ wq.t() - grid.noise @ wq.t() + bias,
                                   rtol=0, atol=1e-5)
    refold(layer)  # idempotent once the fold matches the weights
    with torch.no_grad():
        torch.testing.assert_close(layer.bias, bias - grid.noise @ wq.t(), rtol=0, atol=1e-5)


def test_zero_noise_is_exactly_the_base_quantizer(data):
    model, x = data
    base = calibrated(model, vitq.recipe("minmax", w_bits=4, a_bits=4), x)
    noisy = copy.deepcopy(base)
    for _, layer in noisy_layers(noisy):
        add_noise(layer, torch.zeros(layer.in_features))
        assert isinstance(layer.input_quantizer.quantizer, NoisyGrid)
    with torch.no_grad():
        assert torch.equal(noisy(x), base(x))
    grid = UniformQuantizer(4)
    grid.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    v = torch.randn(1000)
    assert torch.equal(NoisyGrid(grid, torch.zeros(1))(v), grid(v))


def _mean_abs_error(grid: UniformQuantizer, x: torch.Tensor, n: float, draws: int) -> torch.Tensor:
    """E_N |q(x + N) - N - x| per element, N ~ U(-n, n) drawn independently per element and draw."""
    g = torch.Generator().manual_seed(1)
    total = torch.zeros_like(x)
    for _ in range(draws):
        noise = (torch.rand(x.shape, generator=g) * 2 - 1) * n
        total += (NoisyGrid(grid, noise)(x) - noise - x).abs()
    return total / draws


def test_noise_changes_the_error_of_heavy_tailed_inputs_exactly_as_the_analysis_says():
    """An element at distance d from its nearest level and m = step/2 - d from the nearest decision
    threshold, noise N ~ U(-n, n) with n <= step/2. The expected absolute error of q(x + N) - N is
    d while n <= min(d, m) (the noise crosses nothing); d - (n - m)^2 / (2n) < d for m < n <= d (it
    crosses the threshold: the regime where noise helps); (d^2 + n^2) / (2n) > d for d < n <= m (it
    crosses the level: noise hurts)."""
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((4000,))  # heavy tails: the minmax step is coarse
    grid = UniformQuantizer(6, symmetric=True)
    grid.set_range(x.min(), x.max())
    step = float(grid.scale)
    n = 0.2 * step
    d = (x - grid(x)).abs()
    m = step / 2 - d
    eps = 0.01 * step  # keep clear of the regime boundaries
    plain = n <= torch.minimum(d, m) - eps
    helps = (m + eps < n) & (n <= d - eps)
    hurts = (d + eps < n) & (n <= m - eps)
    assert plain.sum() > 100 and helps.sum() > 100 and hurts.sum() > 100
    err = _mean_abs_error(grid, x, n, draws=2000)
    tol = 0.02 * step  # the Monte-Carlo error of 2000 draws is below 0.006 step
    assert (err[plain] - d[plain]).abs().max() < tol
    assert (err[helps] - (d[helps] - (n - m[helps]) ** 2 / (2 * n))).abs().max() < tol
    assert (err[hurts] - (d[hurts] ** 2 + n**2) / (2 * n)).abs().max() < tol
    assert err[helps].mean() < d[helps].mean() - 0.02 * step  # where the analysis says so: lower
    assert err[hurts].mean() > d[hurts].mean() + 0.02 * step


def _layer(x: torch.Tensor, a_bits: int):
    """A 4-bit-weight QuantLinear, its symmetric input grid set to x's range."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[-1], 32)
    QuantLinear.convert(layer)
    recipe = vitq.recipe("noisyquant", w_bits=4, a_bits=a_bits)  # symmetric activations
    layer.input_quantizer.configure(recipe.resolve("0.input", "linear_input"))
    layer.weight_quantizer.configure(recipe.resolve("0.weight", "weight"))
    layer.input_quantizer.quantizer.set_range(x.min(), x.max())
    layer.weight_quantizer.quantizer.set_range(layer.weight.detach().amin(1), layer.weight.detach().amax(1))
    for p in (layer.input_quantizer, layer.weight_quantizer):
        p.set_mode("quant")
    with torch.no_grad():
        y = torch.nn.functional.linear(x, layer.weight, layer.bias)
    step = float(layer.input_quantizer.quantizer.scale)
    u = (torch.rand(x.shape[-1], generator=torch.Generator().manual_seed(0)) * 2 - 1) * step
    return layer, y, u


def _errors(layer, x, y, u, ks):
    return torch.stack([(layer_output(layer, x, float(k) * u) - y).pow(2).mean() for k in ks])


def test_amplitude_search_takes_the_lowest_output_error_and_zero_when_noise_cannot_help():
    # heavy-tailed (Student t, 2 degrees of freedom): at 4 bits the minmax step is wide, most values lie
    # within a fraction of a step of the zero level, where noise crosses the level and adds error
    x = torch.distributions.StudentT(2.0).sample((2048, 64))
    layer, y, u = _layer(x, 4)
    ks = torch.linspace(0, 1, 41)
    k = search_amplitude(layer, x, y, u, count=41, max_steps=1.0)
    errors = _errors(layer, x, y, u, ks)
    assert k == float(ks[int(errors.argmin())]) == 0.0
    assert (errors[1:] > errors[0]).all()


def test_noise_lowers_the_layer_error_when_values_sit_near_decision_thresholds():
    # values within 0.15 step of the midpoints between levels (the regime where noise helps)
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(-6, 6, (2048, 64), generator=g).float()
    x = (levels + 0.5 + 0.15 * (torch.rand(2048, 64, generator=g) * 2 - 1)) / 7
    x[0, 0], x[0, 1] = -1.0, 1.0  # fix the range so the step is 1/7
    layer, y, u = _layer(x, 4)
    k = search_amplitude(layer, x, y, u, count=41, max_steps=1.0)
    base, noisy = _errors(layer, x, y, u, [0.0, k])
    assert k > 0 and noisy < 0.6 * base  # measured: 0.75 steps, 0.41 x the error


# ---------------------------------------------------------------------------------------------------
# stacking and checkpoints
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [("minmax", {}), ("omse", {}), ("repq", {"w_bits": 6, "a_bits": 6}),
                                     ("noisyquant", {})])
def test_noise_is_stored_and_reloaded_exactly(data, tmp_path, name, kw):
    model, x = data
    recipe = vitq.recipe(name, **kw, **FAST) if name == "noisyquant" else vitq.recipe(name, noisy=True, **kw, **FAST)
    q = calibrated(model, recipe, x)
    vitq.save_quantized(q, tmp_path / "q.ckpt")
    state = torch.load(tmp_path / "q.ckpt", weights_only=False)["state_dict"]
    assert any(k.endswith("input_quantizer.quantizer.noise") for k in state)
    back = vitq.load_quantized(copy.deepcopy(model), tmp_path / "q.ckpt")
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_noise_is_seeded_and_follows_the_chosen_distribution(data):
    model, x = data
    a = calibrated(model, vitq.recipe("minmax", noisy=True, noisy_seed=3, **FAST), x)
    b = calibrated(model, vitq.recipe("minmax", noisy=True, noisy_seed=3, **FAST), x)
    c = calibrated(model, vitq.recipe("minmax", noisy=True, noisy_seed=4, **FAST), x)
    na = [layer.input_quantizer.quantizer.noise for _, layer in noisy_layers(a)]
    nb = [layer.input_quantizer.quantizer.noise for _, layer in noisy_layers(b)]
    nc = [layer.input_quantizer.quantizer.noise for _, layer in noisy_layers(c)]
    assert all(torch.equal(p, r) for p, r in zip(na, nb))
    assert any(not torch.equal(p, r) for p, r in zip(na, nc))
    # the code's base noise, randn * 2 - 1: mean -1, standard deviation 2 (20,000 draws: the sample mean's
    # standard error is 0.014); the paper's U(-1, 1): within [-1, 1], mean 0, standard deviation 1/sqrt(3)
    g = base_noise(20_000, 0, 0, "gaussian")
    assert abs(float(g.mean()) + 1) < 0.05 and abs(float(g.std()) - 2) < 0.05 and float(g.min()) < -5
    u = base_noise(20_000, 0, 0, "uniform")
    assert float(u.min()) >= -1 and float(u.max()) <= 1
    assert abs(float(u.mean())) < 0.02 and abs(float(u.std()) - 3 ** -0.5) < 0.01


def _by_hand(layer, x, noise=None):
    """q(W) q(x + n) + B - q(W) n from the definitions: 4-bit symmetric per-channel weights (amax / 7),
    the input's symmetric signed grid at its scale s (codes -2^(b-1) .. 2^(b-1) - 1)."""
    w = layer.weight.detach()
    sw = w.abs().amax(1, keepdim=True) / 7
    qw = (w / sw).round().clamp(-8, 7) * sw
    grid = layer.input_quantizer.quantizer
    s, half = float(grid.scale), 2 ** (grid.bits - 1)
    n = torch.zeros(x.shape[-1]) if noise is None else noise
    xq = ((x + n) / s).round().clamp(-half, half - 1) * s
    return xq @ qw.t() + layer.bias.detach() - n @ qw.t()


@pytest.mark.parametrize("outliers", [False, True])
def test_clip_search_scales_the_step_by_each_factor_and_keeps_the_lowest_error(outliers):
    """Candidate f sets the step to f * s exactly (f = 1 is the calibrated grid itself); the search keeps the
    factor whose output MSE, computed here from the definitions, is lowest."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1024, 64, generator=g) * 2 - 1
    if outliers:
        x[0, 0] = 40.0  # one huge value stretches the MinMax step: clipping it costs less than the coarse step
    layer, _, _ = _layer(x, 4)
    y = quantized_weight_output(layer, x)
    s = layer.input_quantizer.quantizer.scale.clone()
    factors = torch.linspace(0.2, 1.0, 5)
    errors = []
    for f in factors:
        layer.input_quantizer.quantizer.set_params(s * f, torch.zeros(1))
        errors.append(float((_by_hand(layer, x) - y).pow(2).mean()))
    layer.input_quantizer.quantizer.set_params(s, torch.zeros(1))
    search_clip(layer, x, y, count=5, floor=0.2)
    best = factors[int(torch.tensor(errors).argmin())]
    assert torch.equal(layer.input_quantizer.quantizer.scale, s * best)
    assert (float(best) < 1.0) == outliers  # uniform data: the calibrated step itself, unchanged


def test_searches_score_against_the_layer_with_quantized_weights_or_the_float_layer(data, monkeypatch):
    from vitq.methods import noisyquant

    model, x = data
    seen = []

    def spy(layer, xs, ys, *args):
        seen.append((layer, xs, ys))
        return 0.0

    monkeypatch.setattr(noisyquant, "search_amplitude", spy)
    for target in ("quantized_weights", "float"):
        seen.clear()
        calibrated(model, vitq.recipe("minmax", noisy=True, noisy_target=target, **FAST), x)
        layer, xs, ys = seen[0]
        w = layer.weight.detach() if target == "float" else layer.weight_quantizer(layer.weight).detach()
        torch.testing.assert_close(ys, xs @ w.t() + layer.bias.detach(), rtol=1e-5, atol=1e-5)


def test_noisyquant_recipe_quantizes_the_linear_layers_but_the_head():
    """The code wraps every nn.Linear except `head` (fast_quant.py): no patch embedding, head or attention
    matmul point, symmetric per-tensor inputs, symmetric per-channel weights."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    q = vitq.quantize(m, vitq.recipe("noisyquant"))
    on = sorted(n for n, p in vitq.iter_points(q) if p.configured)
    assert on == sorted(f"blocks.0.{layer}.{what}" for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
                        for what in ("input", "weight"))
    o = vitq.recipe("noisyquant").method_impl().addons[0].options
    assert (o.noisy_noise, o.noisy_target, o.noisy_candidates, o.noisy_range, o.noisy_clip_candidates,
            o.noisy_clip_floor, o.noisy_samples) == ("gaussian", "quantized_weights", 2000, 1.999, 1000, 0.001, None)


def test_repq_fold_maps_the_cached_inputs_to_the_new_layer_inputs(data):
    """RepQ-ViT changes the LayerNorm affine and the next Linear; the noise search must see the inputs the
    folded layer receives, which `capture.remap_inputs` provides."""
    from vitq.methods import capture

    model, x = data
    # float flow: the cached inputs are the float model's, compared below with the folded layer's float inputs
    q = vitq.quantize(copy.deepcopy(model), vitq.recipe("repq", w_bits=6, a_bits=6, calib_flow="float"))
    layer = q.get_submodule("blocks.0.attn.qkv")
    capture.attach([layer], 16, "test")
    vitq.calibrate(q, lambda m: m(x[:16]))
    cached = capture.captured(layer, "test", "qkv").args[0]
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    vitq.set_mode(q, "off")
    with torch.no_grad():
        q(x[:16])
    handle.remove()
    capture.detach_all(q, "test")
    torch.testing.assert_close(cached, seen[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", ["code", "grid"])
def test_clip_search_scores_by_the_codes_rule_or_the_grid(rule):
    """NoisyQuant's code scores a candidate step s on x clamped to +-qmax s (fast_quant.py:43), so code -2^(b-1)
    never occurs in the search although inference uses it; `grid` scores the grid itself. Skewed data whose
    negative tail sits past -qmax s makes the two rules choose different factors; each equals the argmin of
    its own errors computed from the definitions."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2048, 64, generator=g) * 2 - 1
    x[:256] -= 0.6  # a negative tail, beyond -7 s of the clipped grids
    layer, _, _ = _layer(x, 4)
    y = quantized_weight_output(layer, x)
    s = layer.input_quantizer.quantizer.scale.clone()
    factors = torch.linspace(0.3, 1.0, 8)
    errors = {"code": [], "grid": []}
    for f in factors:
        layer.input_quantizer.quantizer.set_params(s * f, torch.zeros(1))
        bound = 7 * float(s * f)
        errors["code"].append(float((_by_hand(layer, x.clamp(-bound, bound)) - y).pow(2).mean()))
        errors["grid"].append(float((_by_hand(layer, x) - y).pow(2).mean()))
    layer.input_quantizer.quantizer.set_params(s, torch.zeros(1))
    search_clip(layer, x, y, count=8, floor=0.3, clamp_first=rule == "code")
    best = {k: int(torch.tensor(v).argmin()) for k, v in errors.items()}
    assert best["code"] != best["grid"]
    assert torch.equal(layer.input_quantizer.quantizer.scale, s * factors[best[rule]])
    assert vitq.recipe("noisyquant").method_impl().options.noisy_clip_score == "code"
