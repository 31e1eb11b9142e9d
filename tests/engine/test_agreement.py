"""Cache decisions are rank 0's: two gloo processes that see different files (node-local caches) take the
same branch, and a process other than 0 never reads its own copy."""
from __future__ import annotations

import datetime
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitq.engine.agreement import decided_on_rank0
from vitq.engine.stages import _read_outcomes


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cache = f"{out_dir}/node{rank}.json"  # rank 0's node holds the float outcomes, rank 1's does not
        if rank == 0:
            with open(cache, "w") as f:
                json.dump({"data": "eval-set", "samples": {"top1": [1.0, 0.0, 1.0]}}, f)
        calls = []

        def decide() -> dict | None:
            calls.append(rank)
            from pathlib import Path

            return _read_outcomes(Path(cache), "eval-set")

        got = decided_on_rank0(lambda **kw: None, decide)  # the process group is up: no trainer needed
        torch.save({"got": got, "calls": calls}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_follows_rank_0s_cache_decision(tmp_path, free_port):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == {"got": {"top1": [1.0, 0.0, 1.0]}, "calls": [0]}
    assert ranks[1] == {"got": {"top1": [1.0, 0.0, 1.0]}, "calls": []}  # rank 0's outcomes, its own file unread
