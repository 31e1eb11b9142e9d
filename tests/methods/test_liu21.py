"""Liu et al. 2021: the alternating Pearson / ranking search against plain re-implementations, bias
correction, the Pareto choice against brute force, and mixed precision through a checkpoint."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import vitq
from vitq.methods.liu21 import Liu21, Product, Target, linear_op, pair_matrix
from vitq.methods.mixed_precision import block_groups, mp_candidates, pareto_choice
from vitq.quant.points import Kind, QuantPoint

from small_vit import calibrated, model_and_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(candidates=8, rounds=4, search_samples=16)  # a smaller search keeps the suite fast


@pytest.fixture(scope="module")
def data():
    return model_and_inputs(32)


def _point(bits: int, amax: float, kind: str = Kind.LINEAR_INPUT) -> QuantPoint:
    p = QuantPoint(kind)
    p.configure(vitq.quant.PointSpec(bits=bits, symmetric=True))
    p.quantizer.set_range(torch.tensor(-amax), torch.tensor(amax))
    p.set_mode("quant")
    return p


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _fq(x, step, bits):
    return torch.clamp(torch.round(x / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step


# ---------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------

def test_one_round_picks_the_steps_a_plain_loop_picks():
    """Weights first with the max-based input step, then the input with the chosen weight step; the
    score is the per-sample Pearson correlation averaged over samples (no bias, so no correction)."""
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((6, 10, 16))
    w = torch.randn(8, 16)
    bits, c = 4, 8
    a_point, b_point = _point(bits, float(x.abs().max())), _point(bits, float(w.abs().max()), Kind.WEIGHT)
    sa, sb = float(a_point.quantizer.scale), float(b_point.quantizer.scale)
    method = Liu21({"candidates": c, "rounds": 1})
    method.search(Product("t", linear_op, x, w, a_point, b_point))
    factors = torch.linspace(0.5, 1.2, c)

    def mean_corr(xq, wq):
        return sum(_pearson(xq[n] @ wq.t(), x[n] @ w.t()) for n in range(len(x))) / len(x)

    fb = max(factors, key=lambda f: mean_corr(_fq(x, sa, bits), _fq(w, sb * f, bits)))
    fa = max(factors, key=lambda f: mean_corr(_fq(x, sa * f, bits), _fq(w, sb * fb, bits)))
    assert float(b_point.quantizer.scale) == pytest.approx(sb * float(fb), rel=1e-6)
    assert float(a_point.quantizer.scale) == pytest.approx(sa * float(fa), rel=1e-6)


def test_ranking_loss_matches_its_definition():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 5, 6)  # samples, heads, query rows, keys
    cand = s.unsqueeze(0) + 0.3 * torch.randn(4, 2, 3, 5, 6)
    method = Liu21({"gamma": 0.1, "theta": 0.2})
    got = method.score(cand.clone(), Target.of(s, rank_pairs=1000))  # 15 pairs: all of them
    plain_corr = method.score(cand.clone(), Target.of(s, rank_pairs=None))
    for c in range(4):
        hinge = [max(0.2 - (cand[c, n, h, r, i] - cand[c, n, h, r, j]) * torch.sign(s[n, h, r, i] - s[n, h, r, j]), 0)
                 for n, h, r in itertools.product(range(2), range(3), range(5)) for i in range(6) for j in range(i + 1, 6)]
        loss = float(sum(hinge)) / len(hinge)
        corr = sum(_pearson(cand[c, n], s[n]) for n in range(2)) / 2
        assert float(plain_corr[c]) == pytest.approx(corr, abs=1e-5)
        assert float(got[c]) == pytest.approx(corr - 0.1 * loss, abs=1e-5)
    d = pair_matrix(6, 4)
    assert d.shape == (6, 4) and (d.sum(0) == 0).all() and (d.abs().sum(0) == 2).all()


def test_bias_correction_removes_the_mean_output_error():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 20, 16)) * 3  # one-sided inputs: quantization shifts the output mean
    w, bias = torch.randn(8, 16), torch.nn.Parameter(torch.randn(8))
    outs = {}
    for corrected in (False, True):
        a_point, b_point = _point(3, float(x.abs().max())), _point(3, float(w.abs().max()), Kind.WEIGHT)
        b = torch.nn.Parameter(bias.detach().clone())
        Liu21({"bias_correction": corrected, "candidates": 6}).search(
            Product("t", linear_op, x, w, a_point, b_point, bias=b))
        q = _fq(x, a_point.quantizer.scale, 3) @ _fq(w, b_point.quantizer.scale, 3).t() + b.detach()
        outs[corrected] = (q - (x @ w.t() + bias.detach())).mean(dim=(0, 1))
    assert outs[True].abs().max() < 1e-4
    assert outs[False].abs().max() > 100 * outs[True].abs().max()


@pytest.fixture(scope="module")
def mixed(data):
    """A mixed-precision calibration, with the model forwards it made counted."""
    model, x = data
    q = vitq.quantize(copy.deepcopy(model), vitq.recipe("liu21", mixed_precision=True, **FAST))
    calls = []
    handle = q.register_forward_pre_hook(lambda m, a: calls.append(1))
    vitq.calibrate(q, lambda m: [m(x[i:i + 16]) for i in range(0, len(x), 16)])
    handle.remove()
    return q, len(calls)


def test_calibration_runs_the_model_once_per_batch_never_per_candidate(mixed):
    q, calls = mixed
    assert calls == 2
    assert not any("_vitq_capture" in m.__dict__ for m in q.modules())  # cached inputs are dropped


def test_liu21_is_closer_to_float_than_its_max_based_start(data):
    model, x = data
    with torch.no_grad():
        fp = model(x)
        outs = {}
        for name, kw in (("start", {"candidates": 2, "rounds": 1}), ("searched", FAST)):
            q = calibrated(model, vitq.recipe("liu21", w_bits=4, a_bits=4, **kw), x)
            outs[name] = q(x)
    # the 2-candidate, 1-round search can only pick 0.5x or 1.2x of the max-based steps
    err = {k: float((v - fp).pow(2).mean()) for k, v in outs.items()}
    assert err["searched"] < err["start"]


# ---------------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------------

def test_candidates_follow_the_paper():
    assert mp_candidates(6) == [4, 5, 6, 7, 8]
    assert mp_candidates(8) == [6, 7, 8, 9, 10]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_choice_is_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 50, (5,), generator=g).tolist()
    omegas = [{b: float(torch.rand(1, generator=g)) * 2.0 ** (-b) for b in range(4, 9)} for _ in sizes]
    budget = 6 * sum(sizes)
    best = min((bits for bits in itertools.product(range(4, 9), repeat=5)
                if sum(s * b for s, b in zip(sizes, bits)) <= budget),
               key=lambda bits: sum(o[b] for o, b in zip(omegas, bits)))
    assert tuple(pareto_choice(omegas, sizes, budget)) == best


def test_mixed_precision_bit_map_is_within_budget_stored_and_reapplied(data, mixed, tmp_path, capsys):
    model, x = data
    q, _ = mixed
    info = q.vitq.recipe.method_impl().describe_model(q)
    groups = [g for g, _, _ in block_groups(q)]
    assert groups == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert set(info["bit_map"]) == set(groups) and all(4 <= b <= 8 for b in info["bit_map"].values())
    assert info["avg_block_bits"] <= 6.0 + 1e-9
    for g, bits in info["bit_map"].items():  # every operand of the module at its width
        widths = {p.quantizer.bits for n, p in vitq.iter_points(q) if n.startswith(g + ".") and p.configured}
        assert widths == {bits}
    assert q.get_submodule("head").weight_quantizer.quantizer.bits == 6  # outside the blocks: the target
    vitq.save_quantized(q, tmp_path / "mp.ckpt")
    back = vitq.load_quantized(copy.deepcopy(model), tmp_path / "mp.ckpt")
    assert back.vitq.recipe.method_impl().describe_model(back)["bit_map"] == info["bit_map"]
    assert "bit map, reloaded" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_fixed_width_reloads_exactly(data, tmp_path):
    model, x = data
    q = calibrated(model, vitq.recipe("liu21", w_bits=8, a_bits=8, **FAST), x)
    vitq.save_quantized(q, tmp_path / "q.ckpt")
    back = vitq.load_quantized(copy.deepcopy(model), tmp_path / "q.ckpt")
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


@pytest.mark.parametrize("kw,message", [
    ({"mixed_precision": True, "w_bits": 6, "a_bits": 8}, "same target"),
    ({"mixed_precision": True, "w_bits": 3, "a_bits": 3}, "target 3 gives 1..5, outside 2..16"),
    ({"scope": "full"}, "quant.scope=matmul"),
    ({"activation": {"symmetric": False}}, "symmetric uniform"),
    ({"candidates": 1}, "at least 2 candidates"),
    ({"gamma": -1.0}, "non-negative"),
])
def test_bad_options_fail_with_the_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        vitq.recipe("liu21", **kw)


def test_a_deep_copy_records_its_own_inputs_and_a_second_calibration_says_what_to_do(data):
    model, x = data
    q = vitq.quantize(copy.deepcopy(model), vitq.recipe("liu21", **FAST))
    twin = copy.deepcopy(q)  # made before calibration: its hooks must fill its own caches
    for m in (q, twin):
        vitq.calibrate(m, lambda mm: mm(x[:16]))
    with torch.no_grad():
        assert torch.equal(q(x), twin(x))
    with pytest.raises(RuntimeError, match="no cached calibration inputs; calibrate a model freshly made"):
        vitq.calibrate(q, lambda mm: mm(x[:16]))  # the cached inputs were dropped after the search


def test_sensitivity_and_error_follow_the_papers_sums_by_hand():
    """Omega_i = sum_j sigma_j(Y_i) ||Y^_i - Y_i||^2. Identity attention maps (4 x 4, 3 heads, 2 samples):
    each head's nuclear norm is 4, the block-diagonal map of all heads 12 (`mean`: 4). An output error of
    0.5 in each of 6 elements per sample: ||.||^2 = 1.5 per sample (`mean`: 0.25 per element)."""
    from vitq.methods.mixed_precision import nuclear_norm, output_error

    maps = torch.eye(4).expand(2, 3, 4, 4)
    assert nuclear_norm(maps, "sum") == pytest.approx(12.0) and nuclear_norm(maps, "mean") == pytest.approx(4.0)
    y = torch.diag(torch.tensor([3.0, 1.0])).expand(5, 2, 2)  # an MLP output: singular values 3 and 1
    assert nuclear_norm(y, "sum") == pytest.approx(4.0)
    out, target = torch.full((2, 3, 2), 0.5), torch.zeros(2, 3, 2)
    assert output_error(out, target, "sum") == pytest.approx(1.5)
    assert output_error(out, target, "mean") == pytest.approx(0.25)
    assert vitq.recipe("liu21").method_impl().options.mp_reduction == "sum"


def test_mixed_precision_gives_the_sensitive_module_more_bits(data):
    """One MLP made far more sensitive (its output weights scaled up 50x, so the same relative rounding
    error is 2500x larger in squared norm): the size budget moves bits to it, so the widths are not all one."""
    model, x = data
    heavy = copy.deepcopy(model)
    with torch.no_grad():
        heavy.blocks[1].mlp.fc2.weight.mul_(50.0)
    q = calibrated(heavy, vitq.recipe("liu21", mixed_precision=True, **FAST), x)
    bits = q.vitq.recipe.method_impl().describe_model(q)["bit_map"]
    assert bits["blocks.1.mlp"] == max(bits.values()) > min(bits.values()), bits


@pytest.mark.parametrize("ranking", [True, False])
def test_ranking_loss_is_scored_at_the_attention_scores_only(data, monkeypatch, ranking):
    model, x = data
    seen: dict[bool, int] = {True: 0, False: 0}
    original = Liu21.score

    def spy(self, out, target):
        seen[target.pairs is not None] += 1
        return original(self, out, target)

    monkeypatch.setattr(Liu21, "score", spy)
    calibrated(model, vitq.recipe("liu21", ranking=ranking, **FAST), x)
    # with ranking: the q.k^T searches (2 blocks, both operands, every round) carry key pairs, nothing else
    assert (seen[True] > 0) == ranking and seen[False] > 0


def test_attention_probabilities_use_the_papers_signed_grid(data):
    """Eq. 1 of the paper, Clip(Round(Y / step), -2^(b-1), 2^(b-1) - 1), for every operand (PTQ4ViT's
    BasePTQ re-implementation does the same for the softmax output); `signed: false` is the switch."""
    model, x = data
    q = calibrated(model, vitq.recipe("liu21", **FAST), x)
    grid = q.blocks[0].attn.softmax.output_quantizer.quantizer
    assert (grid.qmin, grid.qmax) == (-32, 31)  # 6 bits
    unsigned = vitq.recipe("liu21", softmax_output={"signed": False}).specs[Kind.SOFTMAX_OUTPUT]
    assert unsigned.signed is False and unsigned.bits == 6


def test_fused_qkv_gets_one_step_per_third_as_a_plain_loop_picks():
    """W_Q, W_K, W_V as three layers (the paper; BasePTQ's n_V = 3): each third of the rows takes the factor
    of its own max-based step whose third of the output correlates best with float, input step fixed."""
    torch.manual_seed(1)
    x = torch.distributions.StudentT(3.0).sample((6, 10, 16))
    w = torch.cat([torch.randn(8, 16) * s for s in (0.1, 1.0, 5.0)])  # three very different magnitudes
    bits, c = 4, 8
    a_point = _point(bits, float(x.abs().max()))
    b_point = QuantPoint(Kind.WEIGHT)
    b_point.configure(vitq.quant.PointSpec(bits=bits, symmetric=True, per_channel=True))
    b_point.quantizer.set_range(-w.abs().amax(1), w.abs().amax(1))
    b_point.set_mode("quant")
    sa = float(a_point.quantizer.scale)
    Liu21({"candidates": c, "rounds": 1}).search(Product("qkv", linear_op, x, w, a_point, b_point, b_groups=3))
    xq = _fq(x, sa, bits)
    factors = torch.linspace(0.5, 1.2, c)
    want = []
    for third in w.chunk(3):
        base = float(third.abs().max()) / (2 ** (bits - 1) - 1)
        score = [sum(_pearson(xq[n] @ _fq(third, f * base, bits).t(), x[n] @ third.t()) for n in range(6))
                 for f in factors.tolist()]
        want += [float(factors[max(range(c), key=score.__getitem__)]) * base] * 8
    assert torch.allclose(b_point.quantizer.scale.reshape(-1), torch.tensor(want), rtol=1e-6)
    assert b_point.quantizer.scale.unique().numel() == 3


def test_qkv_steps_in_a_vit(data):
    model, x = data
    three = calibrated(model, vitq.recipe("liu21", **FAST), x)
    one = calibrated(model, vitq.recipe("liu21", qkv_steps=1, overrides=[], **FAST), x)
    for i in range(len(model.blocks)):
        assert three.blocks[i].attn.qkv.weight_quantizer.quantizer.scale.unique().numel() == 3
        assert one.blocks[i].attn.qkv.weight_quantizer.quantizer.scale.numel() == 1
        assert three.blocks[i].mlp.fc1.weight_quantizer.quantizer.scale.numel() == 1  # other layers: one step
    with pytest.raises(ValueError, match=r"qkv_steps=3 .*per-channel qkv weight point.*qkv_steps=1"):
        calibrated(model, vitq.recipe("liu21", overrides=[], **FAST), x)
