"""vitq.analyze on a tiny calibrated ViT: the SQNR by hand, the configurations against models switched by
hand, the ranking of a deliberately starved point, state restored, and the overrides it proposes."""
from __future__ import annotations

import copy
import math
import shlex

import numpy as np
import pytest
import timm
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

import vitq
from vitq.quant import Kind, iter_points, set_mode
from vitq.quant.modules import QuantLayerNorm, QuantSoftmax
from vitq.report.sqnr import SQNRMeter
from vitq.sensitivity import flatten_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=5, depth=1,
            embed_dim=16, num_heads=2)
STARVED = "blocks.0.mlp.fc1.input"  # the one point the recipe puts at 2 bits
TWO_BITS = [{"pattern": STARVED, "bits": 2}]


def _hand_sqnr(refs: list[torch.Tensor], outs: list[torch.Tensor]) -> float:
    """10 log10(sum ref^2 / sum (ref - out)^2) over every batch, in numpy float64."""
    ref = np.concatenate([r.detach().numpy().astype(np.float64).ravel() for r in refs])
    out = np.concatenate([o.detach().numpy().astype(np.float64).ravel() for o in outs])
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2)))


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return timm.create_model(**ARCH).eval()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]


def _calibrated(float_model, batches, recipe):
    q = vitq.quantize(copy.deepcopy(float_model), recipe)
    vitq.calibrate(q, lambda m: [m(x) for x, _ in batches])
    return q


@pytest.fixture(scope="module")
def qmodel(float_model, batches):
    return _calibrated(float_model, batches, vitq.recipe("minmax", overrides=TWO_BITS))


@pytest.fixture(scope="module")
def report(qmodel, batches):
    return vitq.analyze(qmodel, batches, progress=False)


def _outputs(model, batches, quantized: set[str]) -> list[torch.Tensor]:
    """A copy of `model` with exactly the `quantized` points in quant mode, switched by hand."""
    m = copy.deepcopy(model)
    set_mode(m, "off")
    for name, point in iter_points(m):
        if name in quantized:
            point.set_mode("quant")
    with torch.no_grad():
        return [m(x) for x, _ in batches]


def _configured(model) -> list[str]:
    return [n for n, p in iter_points(model) if p.configured]


# ---------------------------------------------------------------------------------------------------

def test_sqnr_pools_signal_and_noise_over_batches_as_worked_by_hand():
    # ref [3, 4], out [3, 5]: signal 9 + 16 = 25, noise 0 + 1 = 1 -> 10 log10(25) = 13.9794 dB
    meter = SQNRMeter()
    meter.add(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0]))
    assert meter.db == pytest.approx(13.979400086720377, abs=1e-12)
    # the same values as two batches: pooled, not a mean of per-batch dBs (the first batch alone is +inf)
    pooled = SQNRMeter()
    pooled.add(torch.tensor([3.0]), torch.tensor([3.0]))
    pooled.add(torch.tensor([4.0]), torch.tensor([5.0]))
    assert pooled.db == pytest.approx(13.979400086720377, abs=1e-12)
    equal = SQNRMeter()
    equal.add(torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0]))
    assert equal.db == math.inf
    # a tuple holding a tensor and a dict of tensors is one vector, in order
    flat = flatten_outputs((torch.tensor([3.0]), {"a": torch.tensor([[4.0]]), "b": None}))
    assert flat.tolist() == [3.0, 4.0]


def test_the_two_bit_point_ranks_first_and_alone_costs_the_most(qmodel, report):
    rows = {r["name"]: r for r in report.points}
    assert list(rows) == _configured(qmodel)  # one row per configured point, model order
    assert rows[STARVED]["bits"] == 2 and rows["head.weight"]["bits"] == 8
    assert report.top(1) == [STARVED] and rows[STARVED]["rank"] == 1
    assert sorted(r["rank"] for r in report.points) == list(range(1, len(rows) + 1))
    assert min(report.points, key=lambda r: r["only_sqnr"])["name"] == STARVED
    gains = [r["gain_db"] for r in sorted(report.points, key=lambda r: r["rank"])]
    assert gains == sorted(gains, reverse=True)
    assert rows[STARVED]["unit"] == "blocks.0" and rows["head.input"]["unit"] == "head"
    units = {u["unit"]: u for u in report.units}
    assert list(units) == ["patch_embed", "blocks.0", "head"]
    assert max(units.values(), key=lambda u: u["gain_db"])["unit"] == "blocks.0"
    assert units["blocks.0"]["points"] == 12 and units["head"]["points"] == 2


def test_every_configuration_matches_a_model_switched_by_hand(qmodel, batches):
    """The outputs analyze scored for `all but X` are those of a copy switched by hand (torch.equal), and
    each reported SQNR is the formula evaluated in numpy on the hand-switched copies' outputs."""
    seen: list[tuple[frozenset[str], torch.Tensor, bool]] = []

    def recording(model, batch):
        out = model(batch[0])
        on = frozenset(n for n, p in iter_points(model) if p.mode == "quant")
        integer = any(m.integer for m in model.modules() if isinstance(m, (QuantLayerNorm, QuantSoftmax)))
        seen.append((on, out.clone(), integer))
        return out

    rep = vitq.analyze(qmodel, batches, forward=recording, progress=False)
    names = _configured(qmodel)
    ref = _outputs(qmodel, batches, set())
    rows = {r["name"]: r for r in rep.points}
    for x in (STARVED, "head.weight", "blocks.0.attn.softmax.output"):
        but = _outputs(qmodel, batches, set(names) - {x})
        scored = [out for on, out, _ in seen if on == frozenset(names) - {x}]
        assert len(scored) == len(batches)
        assert all(torch.equal(a, b) for a, b in zip(scored, but))
        assert rows[x]["all_but_sqnr"] == pytest.approx(_hand_sqnr(ref, but), rel=1e-9)
        assert rows[x]["only_sqnr"] == pytest.approx(_hand_sqnr(ref, _outputs(qmodel, batches, {x})), rel=1e-9)
    everything = _hand_sqnr(ref, _outputs(qmodel, batches, set(names)))
    assert rep.totals["all"]["sqnr"] == pytest.approx(everything, rel=1e-9)
    assert rows[STARVED]["gain_db"] == pytest.approx(rows[STARVED]["all_but_sqnr"] - everything, rel=1e-9)
    weights = {n for n, p in iter_points(qmodel) if p.configured and p.kind == Kind.WEIGHT}
    assert len(weights) == 6  # patch_embed.proj, qkv, proj, fc1, fc2, head
    assert rep.totals["weights_only"]["sqnr"] == pytest.approx(_hand_sqnr(ref, _outputs(qmodel, batches, weights)),
                                                               rel=1e-9)
    head = {n for n in names if n.startswith("head.")}
    units = {u["unit"]: u for u in rep.units}
    assert units["head"]["only_sqnr"] == pytest.approx(_hand_sqnr(ref, _outputs(qmodel, batches, head)), rel=1e-9)
    assert not any(integer for _, _, integer in seen)


def test_the_metric_is_the_mean_per_sample_value_by_hand(qmodel, batches):
    ref = _outputs(qmodel, batches, set())
    quant = _outputs(qmodel, batches, set(_configured(qmodel)))
    # labels: the float argmax, so the float metric is 1 by construction and "all" is the agreement rate
    labelled = [(x, r.argmax(-1)) for (x, _), r in zip(batches, ref)]
    agree = sum(int((q.argmax(-1) == r.argmax(-1)).sum()) for q, r in zip(quant, ref)) / 8

    rep = vitq.analyze(qmodel, labelled, metric=lambda out, b: (out.argmax(-1) == b[1]).float(), progress=False)
    assert rep.totals["float"]["metric"] == 1.0
    assert rep.totals["all"]["metric"] == agree
    assert all(r["only_metric"] is not None and 0 <= r["only_metric"] <= 1 for r in rep.points)
    assert all(r["only_metric"] is None for r in vitq.analyze(qmodel, batches, progress=False).points)


def test_a_given_float_model_is_the_reference(float_model, qmodel, batches):
    fp = copy.deepcopy(float_model).train()
    with torch.no_grad():
        ref = [fp.eval()(x) for x, _ in batches]
    fp.train()
    rep = vitq.analyze(qmodel, batches, fp_model=fp, progress=False)
    quant = _outputs(qmodel, batches, set(_configured(qmodel)))
    assert rep.totals["all"]["sqnr"] == pytest.approx(_hand_sqnr(ref, quant), rel=1e-9)
    assert fp.training and all(m.training for m in fp.modules())


@pytest.fixture(scope="module")
def integer_model(float_model, batches):
    q = _calibrated(float_model, batches, "fqvit")
    assert vitq.set_integer(q, True, "fqvit") == 4  # norm1, norm2 and the softmax of the one block, the final norm
    return q


def _state(model):
    return ([(n, p.mode) for n, p in iter_points(model)],
            [(n, m.integer) for n, m in model.named_modules() if isinstance(m, (QuantLayerNorm, QuantSoftmax))],
            [(n, m.training) for n, m in model.named_modules()])


def _prepare(model):
    """A state analyze must not disturb: one point off by the caller, the model training except its head."""
    dict(iter_points(model))["head.input"].set_mode("off")
    model.train()
    model.head.eval()
    return _state(model)


def test_modes_integer_kernels_and_training_flags_come_back(integer_model, batches):
    model = copy.deepcopy(integer_model)
    before = _prepare(model)
    assert ("blocks.0.attn.softmax", "fqvit") in before[1] and ("head.input", "off") in before[0]
    kernels_seen = []

    def forward(m, batch):
        kernels_seen.append(any(k.integer for k in m.modules() if isinstance(k, (QuantLayerNorm, QuantSoftmax))))
        assert not m.training
        return m(batch[0])

    vitq.analyze(model, batches, forward=forward, progress=False)
    assert _state(model) == before
    assert kernels_seen and not any(kernels_seen)


def test_state_comes_back_when_forward_raises(integer_model, batches):
    model = copy.deepcopy(integer_model)
    before = _prepare(model)
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 5:  # inside the configurations, after the reference pass
            raise RuntimeError("boom")
        return m(batch[0])

    with pytest.raises(RuntimeError, match="boom"):
        vitq.analyze(model, batches, forward=failing, progress=True)
    assert _state(model) == before


def test_an_uncalibrated_or_float_model_is_refused(float_model, batches):
    q = vitq.quantize(copy.deepcopy(float_model), "minmax")
    with pytest.raises(ValueError, match=r"vitq\.calibrate"):
        vitq.analyze(q, batches, progress=False)
    with pytest.raises(ValueError, match=r"vitq\.calibrate"):
        vitq.analyze(float_model, batches, progress=False)


def test_batches_that_change_between_passes_are_refused(qmodel):
    class Reshuffled:
        """A loader that draws new data on every pass (shuffling, random augmentation)."""

        def __iter__(self):
            return iter([torch.randn(2, 3, 16, 16) for _ in range(2)])

    with pytest.raises(ValueError, match="differs from the reference pass"):
        vitq.analyze(qmodel, Reshuffled(), progress=False)


def test_proposed_overrides_round_trip_through_hydra_and_the_recipe(float_model, batches, report):
    arg = report.hydra_override(1, bits=8, existing=TWO_BITS)
    parsed = OverridesParser.create().parse_overrides([arg])[0]
    assert parsed.key_or_group == "quant.overrides"
    value = parsed.value()
    assert value == [{"pattern": "blocks.0.mlp.fc1.input", "bits": 2}, {"pattern": "blocks.0.mlp.fc1.input", "bits": 8}]
    assert shlex.split(report.hydra_override(1, bits=8, existing=TWO_BITS, shell=True)) == [arg]

    def bits_of(overrides):
        q = vitq.quantize(copy.deepcopy(float_model), vitq.recipe("minmax", overrides=overrides))
        point = dict(iter_points(q))[STARVED]
        return point.quantizer.bits if point.configured else None

    assert bits_of(TWO_BITS) == 2  # the control: without the proposal the point stays starved
    assert bits_of(value) == 8
    assert report.overrides(1, bits=None) == [{"pattern": STARVED, "enable": False}]
    assert bits_of(TWO_BITS + report.overrides(1, bits=None)) is None
    # only points narrower than the proposed width are proposed: the 8-bit points are not "kept" at 6 bits
    assert report.overrides(2, bits=6) == [{"pattern": STARVED, "bits": 6}]
    assert report.top(2, narrower_than=6) == [STARVED] and len(report.top(2)) == 2
