"""`EpochShuffle` (the training order of finetuning, by (seed, epoch) alone, in equal shares per process) and
the device every collective runs on."""
from __future__ import annotations

import pytest
import torch

import vitq.distributed as distributed
from vitq.distributed import EpochShuffle, collective_device


def _shares(size: int, seed: int, epoch: int, world: int, monkeypatch) -> list[list[int]]:  # noqa: ANN001
    shares = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank_world", lambda group=None, r=rank: (r, world))
        sampler = EpochShuffle(size, seed)
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
        assert len(sampler) == len(shares[-1])
    return shares


def test_one_process_gets_a_permutation_fixed_by_seed_and_epoch(monkeypatch):
    (a,) = _shares(10, 0, 0, 1, monkeypatch)
    (b,) = _shares(10, 0, 0, 1, monkeypatch)
    (c,) = _shares(10, 0, 1, 1, monkeypatch)
    (d,) = _shares(10, 1, 0, 1, monkeypatch)
    assert sorted(a) == list(range(10)) and a == b
    assert c != a and d != a  # another epoch, another seed: another order


@pytest.mark.parametrize("size, world", [(10, 2), (11, 2), (10, 3)])
def test_processes_get_equal_disjoint_shares_of_one_permutation(size, world, monkeypatch):
    shares = _shares(size, 0, 2, world, monkeypatch)
    (whole,) = _shares(size, 0, 2, 1, monkeypatch)
    assert {len(s) for s in shares} == {size // world}  # the same number of steps on every process
    used = [i for s in shares for i in s]
    assert len(used) == len(set(used)) == size // world * world  # no sample twice, the remainder dropped
    assert set(used) == set(whole[: size // world * world])


@pytest.mark.parametrize("backend, device", [("nccl", "cuda:3"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"),
                                             ("mpi", "cpu")])
def test_collectives_run_on_the_device_the_backend_takes(monkeypatch, backend, device):
    monkeypatch.setattr("torch.distributed.get_backend", lambda group=None: backend)
    monkeypatch.setattr("torch.cuda.current_device", lambda: 3)
    assert collective_device() == torch.device(device)
