"""An NCCL-only process group's device rule, simulated on the CPU.

NCCL takes only tensors on its CUDA device; a CPU tensor handed to it fails. On a CPU-only machine every
tensor is on the CPU, so "on the backend's device" is represented by provenance: a tensor is acceptable
only if `vitq.distributed` staged it for the collective (`stage` / `empty`, which the rule tags), as it
would have to copy a CPU tensor to CUDA under NCCL. A tensor of the model, an observer or a plain
`torch.tensor(...)` handed to a collective is what NCCL rejects. Collectives called from vitq's code are
checked (Lightning's own move tensors to the root device themselves); violations are recorded, not
raised, so a rank never leaves its peers waiting, and `install(log_dir)` also writes them to a file per rank.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

TENSOR_OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
              "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single")
OBJECT_OPS = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")
violations: list[str] = []
_log: Path | None = None  # this rank's file: created empty at install, each violation appended at once


def _caller() -> str:
    frame = sys._getframe(2)
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno}"


def _tensors(args: tuple, kwargs: dict) -> list:
    import torch

    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, torch.Tensor))
    return found


def _record(violation: str) -> None:
    violations.append(violation)
    if _log is not None:
        with open(_log, "a") as f:
            f.write(violation + "\n")


def _checked(name: str, fn):  # noqa: ANN001, ANN202
    def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        where = _caller()
        if where.startswith("vitq"):
            if name in OBJECT_OPS:
                if kwargs.get("device") is None:
                    _record(f"{name} from {where} without the backend's device")
            else:
                bad = [t for t in _tensors(args, kwargs) if not getattr(t, "_on_backend_device", False)]
                if bad:
                    _record(f"{name} from {where}: {len(bad)} tensor(s) on {bad[0].device} that were not staged "
                            "on the backend's device")
        return fn(*args, **kwargs)

    call._nccl_rule = True
    return call


def install(log_dir: str | None = None) -> None:
    """Wrap torch.distributed's collectives and tag what `vitq.distributed` stages."""
    import vitq.distributed as d

    if getattr(dist.all_reduce, "_nccl_rule", False):  # installed already
        return
    stage, empty = getattr(d, "stage", None), getattr(d, "empty", None)  # (code without staging: nothing tagged)

    def tagged_stage(t, device):  # noqa: ANN001, ANN202
        out = stage(t, device)
        out._on_backend_device = True
        return out

    def tagged_empty(shape, dtype, device):  # noqa: ANN001, ANN202
        out = empty(shape, dtype, device)
        out._on_backend_device = True
        return out

    if stage is not None:
        d.stage, d.empty = tagged_stage, tagged_empty
    for name in (*TENSOR_OPS, *OBJECT_OPS):
        if hasattr(dist, name):
            setattr(dist, name, _checked(name, getattr(dist, name)))
    if log_dir:  # Lightning gives the ranks it starts LOCAL_RANK; the first process has none
        global _log
        _log = Path(log_dir) / f"rank{os.environ.get('LOCAL_RANK') or os.environ.get('RANK') or '0'}.txt"
        _log.parent.mkdir(parents=True, exist_ok=True)
        _log.write_text("")
