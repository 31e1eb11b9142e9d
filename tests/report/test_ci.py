"""The paired bootstrap interval of a metric difference."""
from __future__ import annotations

import pytest
import torch

from vitq.report.ci import paired_bootstrap


def test_identical_outcomes_give_a_zero_width_interval():
    x = (torch.rand(500) < 0.7).float()
    assert paired_bootstrap(x, x) == (0.0, 0.0, 0.0)


def test_interval_matches_the_normal_approximation_of_paired_changes():
    g = torch.Generator().manual_seed(0)
    fp = (torch.rand(10000, generator=g) < 0.8).float()
    quant = fp.clone()
    flip = torch.randperm(10000, generator=g)
    quant[flip[:300]] = 1 - quant[flip[:300]]  # 300 changed outcomes
    delta, low, high = paired_bootstrap(fp, quant)
    d = (quant - fp).double()
    assert delta == pytest.approx(100 * float(d.mean()), abs=1e-9)
    se = 100 * float(d.std()) / 10000**0.5
    assert low == pytest.approx(delta - 1.96 * se, abs=0.25 * se)  # 1000 resamples: within a quarter SE
    assert high == pytest.approx(delta + 1.96 * se, abs=0.25 * se)


def test_reproducible_and_paired():
    fp = torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1])
    quant = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 1])
    assert paired_bootstrap(fp, quant) == paired_bootstrap(fp, quant)
    _, low, high = paired_bootstrap(fp, quant)
    assert low <= -12.5 <= high and high <= 0.0  # one loss in eight, never a gain
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_bootstrap(fp, quant[:4])


def test_compare_runs_pairs_the_outcomes_two_runs_wrote(tmp_path):
    import torch

    from vitq.report.ci import compare_runs, paired_bootstrap

    a, b = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    for name, top1 in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        torch.save({"top1": top1, "top5": torch.ones(4)}, tmp_path / name / "outcomes.pt")
    assert compare_runs(tmp_path / "a", tmp_path / "b") == paired_bootstrap(a, b)
    assert compare_runs(tmp_path / "a", tmp_path / "b", "top5") == (0.0, 0.0, 0.0)
