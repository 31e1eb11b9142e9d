"""Liu et al.'s mixed precision: one width per MSA / MLP module of each transformer block, chosen on the
exact Pareto frontier of (model size, sensitivity-weighted output error) under the size budget. The
search of each candidate width is the method's (`liu21.py`); this module holds the groups, the
snapshots of a group's points while widths are tried, the choice and the bit map."""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import torch
from torch import nn

from ..models import units
from ..quant.modules import QuantMatMul, QuantSoftmax, QuantWeight
from ..quant.points import QuantPoint
from . import capture

log = logging.getLogger(__name__)


def mp_candidates(target: int) -> list[int]:
    """Liu et al.: {4..8} for a 6-bit target, {6..10} for 8 bits; in general target-2 .. target+2."""
    return list(range(target - 2, target + 3))


def block_groups(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, 'msa' | 'mlp') for every child of a transformer block that gets one width: the child
    holding the softmax is the MSA, every other child with weighted layers an MLP. Blocks are the
    adapter's units that contain an attention softmax."""
    for uname, unit in units(model):
        if not any(isinstance(m, QuantSoftmax) for m in unit.modules()):
            continue
        for cname, child in unit.named_children():
            if any(isinstance(m, QuantSoftmax) for m in child.modules()):
                yield f"{uname}.{cname}", child, "msa"
            elif any(isinstance(m, QuantWeight) for m in child.modules()):
                yield f"{uname}.{cname}", child, "mlp"


def sensitivity(group: nn.Module, kind: str, cap: capture.Capture, owner: str, reduction: str = "sum") -> float:
    """The paper's sensitivity of a module: the nuclear norm of its attention map (MSA) or of its output
    (MLP), per cached sample (`nuclear_norm`)."""
    if kind == "msa":
        av = next(m for m in group.modules() if isinstance(m, QuantMatMul) and m.a_quantizer is None)
        return nuclear_norm(capture.captured(av, owner, "attention map").args[0], reduction)
    out = cap.output
    return nuclear_norm(out.reshape(out.shape[0], -1, out.shape[-1]), reduction)


def nuclear_norm(maps: torch.Tensor, reduction: str = "sum") -> float:
    """Sum of singular values of each sample's map, averaged over samples. Maps [S, heads, N, N]: `sum`
    adds the heads' norms (the nuclear norm of the block-diagonal map of all heads), `mean` averages them."""
    norms = torch.linalg.matrix_norm(maps.double(), ord="nuc")  # [S] or [S, heads]
    if norms.dim() > 1 and reduction == "sum":
        norms = norms.sum(dim=tuple(range(1, norms.dim())))
    return float(norms.mean())


def output_error(out: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> float:
    """||Y^ - Y||^2 per sample, averaged over samples (`sum`, the paper's squared norm), or the mean over
    every element (`mean`)."""
    e = (out.double() - target.double()).pow(2)
    return float(e.reshape(e.shape[0], -1).sum(1).mean()) if reduction == "sum" else float(e.mean())


def _points(group: nn.Module) -> Iterator[QuantPoint]:
    for m in group.modules():
        if isinstance(m, QuantPoint) and m.configured:
            yield m


def snapshot_bits(group: nn.Module, bits: int) -> None:
    """Every point of the group to `bits`, starting from the max-based step of its calibrated range."""
    for p in _points(group):
        q = p.quantizer
        amax = q.scale.detach() * q.qmax if not hasattr(p, "_liu21_amax") else p._liu21_amax
        p._liu21_amax = amax  # the calibrated range, kept while widths are tried
        p.configure(dataclasses.replace(p.spec, bits=bits))
        p.quantizer.set_params(amax / p.quantizer.qmax, torch.zeros_like(amax))
        p.set_mode("quant")
    for m in group.modules():
        if isinstance(m, QuantWeight) and m.bias is not None:
            if not hasattr(m, "_liu21_bias"):
                m._liu21_bias = m.bias.detach().clone()
            m.bias.copy_(m._liu21_bias)


def snapshot(group: nn.Module) -> dict:
    pts = {id(p): (p.spec, p.quantizer.scale.detach().clone()) for p in _points(group)}
    biases = {id(m): m.bias.detach().clone() for m in group.modules()
              if isinstance(m, QuantWeight) and m.bias is not None}
    return {"points": pts, "biases": biases}


def restore(group: nn.Module, snap: dict) -> None:
    for p in _points(group):
        spec, scale = snap["points"][id(p)]
        p.configure(spec)
        p.quantizer.set_params(scale, torch.zeros_like(scale))
        p.set_mode("quant")
        p.__dict__.pop("_liu21_amax", None)
    for m in group.modules():
        if id(m) in snap["biases"]:
            m.bias.copy_(snap["biases"][id(m)])
            m.__dict__.pop("_liu21_bias", None)


def pareto_choice(omegas: list[dict[int, float]], sizes: list[int], budget: float) -> list[int]:
    """Widths minimizing the summed error under the size budget, over the exact Pareto frontier of
    (size, error): groups are added one at a time, and a partial assignment survives only if no other
    one is both smaller and less wrong."""
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for omega, size in zip(omegas, sizes):
        grown = sorted((c + size * b, e + w, bits + (b,)) for c, e, bits in front for b, w in omega.items())
        front = []
        for c, e, bits in grown:
            if not front or e < front[-1][1]:
                front.append((c, e, bits))
    feasible = [f for f in front if f[0] <= budget + 1e-9]
    if not feasible:
        raise ValueError(f"no bit assignment fits the size budget {budget:.0f} (smallest {front[0][0]:.0f})")
    return list(min(feasible, key=lambda f: f[1])[2])


def bit_map(model: nn.Module) -> dict[str, int]:
    """Width of each MSA/MLP module, read from its weight points (so it holds after a reload too)."""
    out = {}
    for gname, group, _ in block_groups(model):
        bits = {p.quantizer.bits for m in group.modules() if isinstance(m, QuantWeight)
                for p in [m.weight_quantizer] if p.configured}
        out[gname] = max(bits) if bits else None
    return out


def average_bits(model: nn.Module) -> float:
    """Weight-count-weighted average width of the MSA/MLP modules' weights."""
    total = count = 0
    for _, group, _ in block_groups(model):
        for m in group.modules():
            if isinstance(m, QuantWeight) and m.weight_quantizer.configured:
                total += m.weight.numel() * m.weight_quantizer.quantizer.bits
                count += m.weight.numel()
    return total / max(count, 1)


def print_bit_map(bits: dict[str, int], what: str) -> None:
    text = ", ".join(f"{k}={v}" for k, v in bits.items())
    log.info("liu21 mixed-precision bit map, %s: %s", what, text)
    print(f"liu21 mixed-precision bit map, {what}: {text}")
