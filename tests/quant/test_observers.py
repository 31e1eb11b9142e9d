"""Observers against hand-computed ranges, merging, and sync across real gloo processes."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitq.quant import OBSERVERS, UniformQuantizer, make_observer
from vitq.quant.observers import EMAObserver, MinMaxObserver, PercentileObserver
from vitq.quant.sample_observers import OMSEObserver


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


def _l2(quantizer: UniformQuantizer, lo, hi, x) -> float:
    quantizer.set_range(lo, hi)
    return (quantizer(x) - x).pow(2).sum().item()


# ---------------------------------------------------------------------------------------------------
# hand cases, per tensor
# ---------------------------------------------------------------------------------------------------

def test_minmax_over_batches():
    obs = MinMaxObserver()
    assert obs.empty
    obs.observe(_t(0.5, -1.0, 2.0))
    obs.observe(_t(-3.0, 1.0).reshape(2, 1))  # any shape
    obs.observe(_t(0.0, 1.5))
    lo, hi = obs.range(UniformQuantizer(8))
    assert lo.tolist() == [-3.0] and hi.tolist() == [2.0]


def test_ema_momentum_half_by_hand():
    obs = EMAObserver(momentum=0.5)
    obs.observe(_t(-2.0, 0.0, 1.0))  # first batch is taken as is: [-2, 1]
    lo, hi = obs.range(UniformQuantizer(8))
    assert (lo.item(), hi.item()) == (-2.0, 1.0)
    obs.observe(_t(-4.0, 5.0))  # 0.5 * -2 + 0.5 * -4 = -3 ; 0.5 * 1 + 0.5 * 5 = 3
    lo, hi = obs.range(UniformQuantizer(8))
    assert (lo.item(), hi.item()) == (-3.0, 3.0)
    obs.observe(_t(-1.0, 3.0, 0.0))  # 0.5 * -3 + 0.5 * -1 = -2 ; 0.5 * 3 + 0.5 * 3 = 3
    lo, hi = obs.range(UniformQuantizer(8))
    assert (lo.item(), hi.item()) == (-2.0, 3.0)


def test_ema_default_momentum_and_validation():
    obs = EMAObserver()
    obs.observe(_t(0.0, 1.0))
    obs.observe(_t(0.0, 2.0))
    assert obs.range(UniformQuantizer(8))[1].item() == pytest.approx(0.99 * 1 + 0.01 * 2)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            EMAObserver(momentum=bad)


def test_percentile_hand_case():
    # 0..10 shuffled, alpha = 0.9: hi is the round(0.9 * 10) + 1 = 10th smallest value = 9,
    # lo is the round(0.1 * 10) + 1 = 2nd smallest value = 1
    x = torch.arange(11, dtype=torch.float32)[torch.randperm(11)]
    obs = PercentileObserver(alpha=0.9)
    obs.observe(x)
    lo, hi = obs.range(UniformQuantizer(8))
    assert (lo.item(), hi.item()) == (1.0, 9.0)
    # a second batch 0..40 step 4 has quantiles 4 and 36; the range is the mean over batches
    obs.observe(torch.arange(11, dtype=torch.float32) * 4)
    lo, hi = obs.range(UniformQuantizer(8))
    assert (lo.item(), hi.item()) == (2.5, 22.5)


def test_percentile_alpha_one_is_minmax_and_validation():
    x = torch.randn(1000)
    obs = PercentileObserver(alpha=1.0)
    obs.observe(x)
    lo, hi = obs.range(UniformQuantizer(8))
    assert lo.item() == x.min().item() and hi.item() == x.max().item()
    for bad in (0.5, 0.2, 1.01):
        with pytest.raises(ValueError, match="alpha"):
            PercentileObserver(alpha=bad)


def test_percentile_clips_outlier():
    x = torch.cat([torch.linspace(-1, 1, 999), _t(100.0)])
    obs = PercentileObserver(alpha=0.99)
    obs.observe(x)
    lo, hi = obs.range(UniformQuantizer(8))
    # k = round(0.99 * 999) + 1 = 990: the 990th of 1000 sorted values, i.e. linspace index 989
    assert hi.item() == pytest.approx(-1 + 2 * 989 / 998, abs=1e-6)
    assert lo.item() == pytest.approx(-1 + 2 * 10 / 998, abs=1e-6)  # k = round(0.01 * 999) + 1 = 11


def test_omse_clips_outlier_and_beats_minmax():
    x = torch.cat([torch.rand(2000) * 2 - 1, _t(20.0)])
    quantizer = UniformQuantizer(4)
    obs = OMSEObserver()
    obs.observe(x)
    lo, hi = obs.range(quantizer)
    # it is one of the candidate clips lo*f, hi*f with f = 1 - 0.01 i: measured f = 0.58 (i = 42) on this seed
    f = hi.item() / 20.0
    assert f == pytest.approx(0.58, abs=1e-6)
    assert lo.item() == pytest.approx(x.min().item() * f, rel=1e-5)
    probe = UniformQuantizer(4)
    err_omse = _l2(probe, lo, hi, x)
    err_minmax = _l2(probe, x.min(), x.max(), x)
    assert err_omse < 0.5 * err_minmax  # measured 0.412
    # and it is the best candidate on its grid
    errs = [_l2(probe, x.min() * (1 - 0.01 * i), x.max() * (1 - 0.01 * i), x) for i in range(90)]
    assert err_omse <= min(errs) + 1e-6


def test_omse_keeps_minmax_when_no_outlier():
    # data on the 4-bit grid of its own min/max: clipping can only add error
    x = torch.arange(16, dtype=torch.float32) / 15 * 3 - 1  # the grid of [-1, 2]
    obs = OMSEObserver()
    obs.observe(x)
    lo, hi = obs.range(UniformQuantizer(4))
    assert lo.item() == pytest.approx(-1.0) and hi.item() == pytest.approx(2.0)


def test_omse_sample_is_bounded_keeps_whole_tokens_and_spans_batches():
    obs = OMSEObserver(max_tokens=50)
    for b in range(5):  # tokens [2, 10, 16]: value = batch index in every channel
        obs.observe(torch.full((2, 10, 16), float(b)) + torch.arange(16) * 1e-3)
    sample = obs.state["sample"]
    assert sample.shape == (16, 50)  # [channels, tokens]: every channel of each kept token
    assert torch.equal(sample[:, 0] - sample[0, 0], torch.arange(16) * 1e-3)
    assert set(sample[0].round().tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}  # not just the last batches


def test_omse_scores_every_channel_of_a_wide_tensor():
    """Review fault 1: a strided sample of the flattened tensor saw only channels sharing the stride's
    factors (32 of 384 for DeiT-S at batch 32), so an outlier channel outside them was clipped to a
    tenth of its range. The token sample keeps every channel: the clip must cover the outlier."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 197, 384, generator=g)
    x[..., 7] *= 40  # one outlier channel (index 7 is not a multiple of 32's factors)
    obs = OMSEObserver()
    obs.observe(x)
    assert obs.state["sample"].shape[0] == 384
    q = UniformQuantizer(8)
    lo, hi = obs.range(q)
    # the old strided sample never contained channel 7 and shrank the range to ~10% of it; with every
    # channel scored the clip is 0.70 of the outlier channel's range at both ends (measured on this seed)
    assert float(hi) == pytest.approx(0.70 * float(x[..., 7].max()), rel=1e-5)
    assert float(lo) == pytest.approx(0.70 * float(x[..., 7].min()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# per channel
# ---------------------------------------------------------------------------------------------------

WEIGHT = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                       [-0.5, 0.25, 0.0, 0.1],
                       [10.0, 20.0, -30.0, 5.0]])  # [C=3, N=4]


def test_minmax_per_channel_axis0_weight():
    obs = MinMaxObserver(axis=0)
    obs.observe(WEIGHT)
    lo, hi = obs.range(UniformQuantizer(8, axis=0))
    assert lo.tolist() == [-2.0, -0.5, -30.0]
    assert hi.tolist() == [3.0, 0.25, 20.0]


def test_minmax_per_channel_last_axis_activation():
    x = torch.zeros(2, 3, 4)  # [B, T, C]
    x[0, 1, 0], x[1, 2, 0] = -7.0, 4.0
    x[1, 0, 2] = 9.0
    x[0, 0, 3], x[0, 2, 3] = -1.5, -0.5
    obs = MinMaxObserver(axis=-1)
    obs.observe(x)
    obs.observe(x * 0 + torch.tensor([0.0, 0.0, 0.0, -2.0]))  # second batch lowers channel 3
    lo, hi = obs.range(UniformQuantizer(8, axis=-1))
    assert lo.tolist() == [-7.0, 0.0, 0.0, -2.0]
    assert hi.tolist() == [4.0, 0.0, 9.0, 0.0]


def test_ema_per_channel_last_axis():
    obs = EMAObserver(axis=-1, momentum=0.5)
    obs.observe(torch.tensor([[[0.0, -4.0], [2.0, 4.0]]]))  # [1, 2, 2]: channel 0 in [0, 2], 1 in [-4, 4]
    obs.observe(torch.tensor([[[-2.0, 0.0], [6.0, 2.0]]]))  # channel 0 in [-2, 6], 1 in [0, 2]
    lo, hi = obs.range(UniformQuantizer(8))
    assert lo.tolist() == [-1.0, -2.0] and hi.tolist() == [4.0, 3.0]


def test_percentile_per_channel_axis0():
    w = torch.stack([torch.arange(11.0), torch.arange(11.0) * -2])  # [2, 11]
    obs = PercentileObserver(axis=0, alpha=0.9)
    obs.observe(w)
    lo, hi = obs.range(UniformQuantizer(8, axis=0))
    assert lo.tolist() == [1.0, -18.0] and hi.tolist() == [9.0, -2.0]


def test_omse_per_channel_only_clips_channel_with_outlier():
    base = torch.rand(2, 2000) * 2 - 1
    base[0, 0], base[0, 1] = -1.0, 1.0  # channel 0: plain [-1, 1], nothing to clip
    base[1, 0] = 20.0  # channel 1: one outlier
    obs = OMSEObserver(axis=0)
    obs.observe(base)
    lo, hi = obs.range(UniformQuantizer(4, axis=0))
    # channel 1 is clipped to 0.58 of its range (measured on this seed: 20 * 0.58 = 11.6)
    assert hi[1].item() == pytest.approx(11.6, rel=1e-5)
    # channel 0 is searched independently of channel 1's outlier: it keeps its full range
    assert (lo[0].item(), hi[0].item()) == (-1.0, 1.0)
    # each channel gets exactly what a per-tensor search on that channel alone gives
    for c in range(2):
        alone = OMSEObserver()
        alone.observe(base[c])
        lo_c, hi_c = alone.range(UniformQuantizer(4))
        torch.testing.assert_close(lo[c], lo_c[0])
        torch.testing.assert_close(hi[c], hi_c[0])


# ---------------------------------------------------------------------------------------------------
# merging: one observer over all batches == per-batch observers merged
# ---------------------------------------------------------------------------------------------------

def _two_halves():
    x = torch.randn(2, 8, 6) * torch.linspace(0.5, 3, 6)
    x[1, 3, 2] = 25.0
    return x[0:1], x[1:2]


ALL_CALIBRATORS = [("minmax", {}), ("ema", {"momentum": 0.5}), ("percentile", {"alpha": 0.95}),
                   ("omse", {"max_tokens": 20}), ("quantile", {"max_tokens": 20})]


def _as_ranks(name: str, kwargs: dict, axis, batches: list[torch.Tensor], world: int = 2):
    """One process over `batches`, and `world` observers that each saw the whole batches a rank gets
    (`BatchShards`: rank r has batches r, r + world, ...), merged."""
    full = make_observer(name, axis=axis, **kwargs)
    for b in batches:
        full.observe(b)
    ranks = []
    for r in range(world):
        obs = make_observer(name, axis=axis, **kwargs)
        obs.shard = (r, world)
        for b in batches[r::world]:
            obs.observe(b)
        ranks.append(obs)
    merged = ranks[0]
    for other in ranks[1:]:
        merged.merge_(other)
    return full, merged


@pytest.mark.parametrize("name, kwargs", ALL_CALIBRATORS)
@pytest.mark.parametrize("axis", [None, -1])
def test_merge_of_rank_shards_equals_one_process(name, kwargs, axis):
    """Five batches over two ranks (3 and 2): order-dependent calibrators (EMA, per-batch quantiles, the
    token reservoir) fold them in global batch order, so the merge is exactly one process's result."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(2, 8, 6, generator=g) * torch.linspace(0.5, 3, 6) for _ in range(5)]
    batches[3][1, 3, 2] = 25.0
    full, merged = _as_ranks(name, kwargs, axis, batches)
    q = UniformQuantizer(4, axis=axis)
    for got, want in zip(merged.range(q), full.range(q)):
        assert torch.equal(got, want), name
    ordered = (lambda o: o._in_batch_order()) if "batch" in full.state else (lambda o: o.state)  # noqa: E731
    assert ordered(merged).keys() == ordered(full).keys()
    for key, value in ordered(full).items():  # the statistics themselves, not only the range
        assert torch.equal(ordered(merged)[key], value), key


def test_ema_merge_differs_from_a_mean_of_rank_emas():
    """What the per-batch columns buy: the mean of per-rank EMAs (the former merge) is not one process's EMA."""
    batches = [_t(-2.0, 4.0), _t(-6.0, 0.0), _t(-1.0, 1.0)]
    full, merged = _as_ranks("ema", {"momentum": 0.5}, None, batches)
    lo, hi = merged.range(None)
    assert (lo.item(), hi.item()) == full_range(full) == (-2.5, 1.5)  # ((-2 + -6) / 2 + -1) / 2, ((4 + 0) / 2 + 1) / 2
    rank_means = ((-2.0 * 0.5 + -1.0 * 0.5) + -6.0) / 2  # EMA of rank 0's batches 0, 2; rank 1 has batch 1 only
    assert lo.item() != rank_means


def full_range(obs):
    lo, hi = obs.range(None)
    return lo.item(), hi.item()


def test_merge_trims_sample_to_the_cap_by_key():
    a, b = torch.randn(1, 40, 4), torch.randn(1, 40, 4)
    left, right = OMSEObserver(max_tokens=30), OMSEObserver(max_tokens=30)
    right.shard = (1, 2)
    left.shard = (0, 2)
    left.observe(a)
    right.observe(b)
    keys = torch.cat([left.state["keys"], right.state["keys"]])
    tokens = torch.cat([left.state["sample"], right.state["sample"]], 1)
    left.merge_(right)
    assert left.state["sample"].shape == (4, 30)
    keep = keys.topk(30, largest=False).indices
    assert torch.equal(left.state["sample"], tokens[:, keep])
    assert torch.equal(left.state["keys"], keys[keep]) and bool((left.state["keys"].diff() > 0).all())


def test_merge_with_empty_sides():
    full = MinMaxObserver()
    full.observe(_t(-1.0, 2.0))
    empty = MinMaxObserver()
    full.merge_(empty)
    assert full.range(None)[0].item() == -1.0
    empty.merge_(full)
    assert empty.range(None)[1].item() == 2.0
    empty.state["max"] += 1  # a copy, not an alias
    assert full.range(None)[1].item() == 2.0


def test_observer_state_does_not_alias_input():
    for name in ("minmax", "ema", "percentile", "omse"):
        x = torch.cat([torch.linspace(-1, 1, 99), _t(30.0)])
        obs = make_observer(name)
        obs.observe(x)
        before = [t.clone() for t in obs.range(UniformQuantizer(4))]
        x.mul_(0.0)  # e.g. a reused input buffer or an in-place residual add
        after = obs.range(UniformQuantizer(4))
        assert all(torch.equal(u, v) for u, v in zip(before, after)), name


def test_sync_is_noop_without_distributed():
    obs = MinMaxObserver()
    obs.observe(_t(-1.0, 2.0))
    assert obs.sync_() is obs
    assert obs.range(None)[0].item() == -1.0 and obs.merged == 1


# ---------------------------------------------------------------------------------------------------
# sync_ across two real processes (gloo on localhost)
# ---------------------------------------------------------------------------------------------------

def _sync_batches() -> list[torch.Tensor]:
    """Five batches of one process's calibration, the last one short; an outlier in batch 3 (rank 1's)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(5, 120, 4, generator=g) * torch.tensor([0.5, 1.0, 2.0, 4.0])
    x[3, 7, 1] = 40.0
    return [x[0], x[1], x[2], x[3], x[4][:50]]


def _make_sync_observers():
    observers = {}
    for name, kwargs in ALL_CALIBRATORS:
        observers[name] = make_observer(name, **kwargs)
        observers[name + "_c"] = make_observer(name, axis=-1, **kwargs)
    return observers


def _sync_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mine = _sync_batches()[rank::world]  # whole batches, as BatchShards gives them
        result = {}
        for key, obs in _make_sync_observers().items():
            for batch in mine:
                with torch.inference_mode():  # as under Lightning's validate loop
                    obs.observe(batch)
            obs.sync_()
            q = UniformQuantizer(4, axis=-1 if key.endswith("_c") else None)
            result[key] = [t.clone() for t in obs.range(q)]
            result[key + "/merged"] = obs.merged
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_across_two_gloo_processes_equals_one_process(tmp_path, free_port):
    """Every calibrator, per tensor and per channel, synced over two ranks with uneven shards (3 and 2
    batches): bit for bit one process's range over the same batches, and the same on both ranks."""
    mp.spawn(_sync_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = _make_sync_observers()
    for key, obs in single.items():
        for batch in _sync_batches():
            obs.observe(batch)
        q = UniformQuantizer(4, axis=-1 if key.endswith("_c") else None)
        want = obs.range(q)
        assert r0[key + "/merged"] == 2
        for got0, got1, w in zip(r0[key], r1[key], want):
            assert torch.equal(got0, got1), key  # every rank ends identical
            assert torch.equal(got0, w), key  # and equal to one process seeing every batch
    assert r0["minmax"][1].item() == 40.0  # the outlier seen by rank 1 only reaches rank 0


# ---------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------

def test_make_observer_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="minmaxx") as e:
        make_observer("minmaxx")
    listed = str(e.value).split("; known: ")[1].split(" (")[0].split(", ")
    for name in ("minmax", "ema", "percentile", "omse"):
        assert name in listed


def test_make_observer_passes_axis_and_kwargs():
    obs = make_observer("ema", axis=0, momentum=0.25)
    assert isinstance(obs, EMAObserver) and obs.axis == 0 and obs.momentum == 0.25
    assert set(OBSERVERS) >= {"minmax", "ema", "percentile", "omse"}


def test_uncapped_sample_keeps_every_token_and_merges_them_all():
    """max_tokens=None (RepQ-ViT's searches on its whole batch): 5 batches of 20 tokens -> all 100 kept, and a
    two-process merge holds both sides' tokens."""
    obs = OMSEObserver(max_tokens=None)
    for b in range(5):
        obs.observe(torch.full((2, 10, 16), float(b)))
    assert obs.state["sample"].shape == (16, 100)
    assert sorted(obs.state["sample"][0].tolist()) == sorted([float(b) for b in range(5)] * 20)
    left, right = OMSEObserver(max_tokens=None), OMSEObserver(max_tokens=None)
    left.shard, right.shard = (0, 2), (1, 2)
    left.observe(torch.randn(1, 40, 4))
    right.observe(torch.randn(1, 40, 4))
    left.merge_(right)
    assert left.state["sample"].shape == (4, 80)


def test_repq_searches_every_calibration_token():
    import vitq

    specs = vitq.recipe("repq").specs
    assert specs["linear_input"].observer_args["max_tokens"] is None
    assert specs["softmax_output"].observer_args["max_tokens"] is None
