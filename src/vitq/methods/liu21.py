"""Liu et al., "Post-Training Quantization for Vision Transformer" (NeurIPS 2021).

Scope `matmul`, symmetric uniform grids. Every matrix product (each Linear/Conv2d: input x weight; q.k^T;
attention x v) searches the steps of its two operands alternately: with one operand's step fixed, the
other's step takes the candidate (`candidates` points spread over [0.5, 1.2] x its max-based step) whose
quantized product has the highest Pearson correlation with the float product, averaged over the
cached calibration samples; for the attention scores the ranking loss gamma * mean((theta - (S^_i -
S^_j) sign(S_i - S_j))+) over sampled key pairs of each row is subtracted. Rounds repeat until neither
step changes (at most `rounds`). After each round a layer's bias absorbs the mean output error
E[q(X) q(W)^T - X W^T] (bias correction). Each product is searched on its own float inputs (cached
during calibration), so a candidate costs one batched product, never a model forward. The fused qkv layer is
the paper's three layers W_Q, W_K, W_V: each third of its rows has its own weight step, searched on its third
of the output (`qkv_steps`, as PTQ4ViT's BasePTQ), with one input step.

Mixed precision (`mixed_precision: true`): every attention module (MSA) and every other weighted child
of a transformer block (MLP) gets one bit width for all its operands, from target-2 .. target+2. For each
candidate width the module is searched as above and its output error ||Y^ - Y||^2 on the cached inputs
is weighted by its sensitivity, the nuclear norm of the attention map (MSA) or of the output (MLP); the
widths minimize the sum of these under the model-size budget (target x the blocks' weight count) over
the exact Pareto frontier of (size, error). The bit map is printed, logged, kept in the model's recipe
as overrides (saved with the checkpoint, so a reload places the same widths) and added to result rows.
The groups, snapshots, Pareto choice and bit map are in `mixed_precision.py`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.modules import QuantMatMul, QuantSoftmax, QuantWeight
from ..quant.points import SCOPES, Kind, PointSpec, QuantPoint
from ..quant.quantizers import MAX_BITS, MIN_BITS
from ..quant.recipe import Override
from . import capture
from .base import Method, register_method
from .mixed_precision import (average_bits, bit_map, block_groups, mp_candidates, output_error, pareto_choice,
                              print_bit_map, restore, sensitivity, snapshot, snapshot_bits)

log = logging.getLogger(__name__)
_CHUNK_ELEMENTS = 2**24  # candidate outputs scored at once (64 MB of float32)


@dataclass
class Liu21Options:
    candidates: int = 20  # candidate steps per search, spread linearly over [0.5, 1.2] x the max-based step
    rounds: int = 20  # at most this many alternating weight/input rounds (stops early when stable)
    ranking: bool = True  # subtract the ranking loss at the attention scores (q.k^T)
    gamma: float = 0.1  # weight of the ranking loss
    theta: float = 0.2  # hinge margin of the ranking loss
    rank_pairs: int = 128  # key pairs per attention row scored by the ranking loss (sampled once, seeded)
    bias_correction: bool = True  # fold the mean output error into the layer bias after each round
    search_samples: int = 32  # cached calibration samples (rows of each layer input) the search scores on
    mixed_precision: bool = False  # one width per MSA / MLP module, target-2 .. target+2, under the size budget
    # the mixed-precision objective: sum (the paper's ||Y^ - Y||^2 per sample, heads' nuclear norms summed)
    # or mean (per element, heads averaged: the former, which reweights modules by their output size)
    mp_reduction: str = "sum"
    qkv_steps: int = 3  # fused qkv weight: a step per third (W_Q, W_K, W_V, the paper) or 1 for the whole weight


@dataclass
class Product:
    """One searched matrix product: two operands (float, cached), their quant points and the layer's bias."""

    name: str
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # leading candidate dims broadcast
    a: torch.Tensor
    b: torch.Tensor
    a_point: QuantPoint | None
    b_point: QuantPoint | None
    bias: nn.Parameter | None = None  # corrected after each round (Linear / Conv2d only)
    channel_dims: int = 1  # trailing output dims that index a bias entry (Linear: last; Conv2d as matmul: last)
    ranking: bool = False
    b_groups: int = 1  # the weight's output rows in this many equal groups, each with its own searched step


@register_method
class Liu21(Method):
    name = "liu21"
    Options = Liu21Options

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        o = self.options
        if o.candidates < 2:
            raise ValueError(f"quant.candidates={o.candidates}: the step search needs at least 2 candidates")
        if o.rounds < 1:
            raise ValueError(f"quant.rounds={o.rounds}: the alternating search needs at least 1 round")
        if o.search_samples < 1 or o.rank_pairs < 1:
            raise ValueError("quant.search_samples and quant.rank_pairs must be at least 1")
        if o.gamma < 0 or o.theta < 0:
            raise ValueError(f"quant.gamma={o.gamma} and quant.theta={o.theta} must be non-negative")
        if o.mp_reduction not in ("sum", "mean"):
            raise ValueError(f"quant.mp_reduction={o.mp_reduction!r}: choose sum (the paper) or mean")
        if o.qkv_steps not in (1, 3):
            raise ValueError(f"quant.qkv_steps={o.qkv_steps}: choose 3 (W_Q, W_K, W_V as three layers, the paper) "
                             "or 1 (one step for the fused qkv weight)")

    # ---- hooks ------------------------------------------------------------------------------------
    def specs(self, specs: dict[str, PointSpec], scope: str) -> dict[str, PointSpec]:
        if scope != "matmul":
            raise ValueError(f"liu21 quantizes the matmul scope (inputs and weights of the matrix products); "
                             f"got quant.scope={scope}: set quant.scope=matmul")
        for kind, spec in specs.items():
            if kind not in SCOPES[scope]:
                continue
            if spec.quantizer != "uniform" or not spec.symmetric:
                raise ValueError(f"liu21 searches steps of symmetric uniform grids; the {kind} spec has "
                                 f"quantizer={spec.quantizer}, symmetric={spec.symmetric}: use quant=liu21's "
                                 "defaults or set symmetric: true")
        if self.options.mixed_precision:
            w, a = specs.get(Kind.WEIGHT), specs.get(Kind.LINEAR_INPUT)
            if w is None or a is None or w.bits != a.bits:
                raise ValueError("quant.mixed_precision=true gives each MSA/MLP one width for weights and inputs: "
                                 "set quant.w_bits and quant.a_bits to the same target (e.g. 6)")
            lo, hi = mp_candidates(w.bits)[0], mp_candidates(w.bits)[-1]
            if lo < MIN_BITS or hi > MAX_BITS:
                raise ValueError(f"quant.mixed_precision=true tries widths target-2 .. target+2; target {w.bits} gives "
                                 f"{lo}..{hi}, outside {MIN_BITS}..{MAX_BITS}: set quant.w_bits=quant.a_bits between "
                                 f"{MIN_BITS + 2} and {MAX_BITS - 2}")
        return specs

    def prepare(self, model: nn.Module) -> None:
        n = self.options.search_samples
        capture.attach([m for _, m in searchable(model)], n, self.name)
        if self.options.mixed_precision:
            capture.attach([m for _, m, _ in block_groups(model)], n, self.name, keep_output=True)

    def after_freeze(self, model: nn.Module) -> None:
        try:
            if self.options.mixed_precision:
                self._mixed_precision(model)
            else:
                for name, module in searchable(model):
                    for product in products(name, module, model, self.options):
                        self.search(product)
        finally:
            capture.detach_all(model, self.name)
        capture.broadcast_from_rank0([t for _, t in searched_tensors(model)])

    def after_load(self, model: nn.Module) -> None:
        if self.options.mixed_precision:
            print_bit_map(bit_map(model), "reloaded")

    def describe_model(self, model: nn.Module) -> dict[str, Any]:
        if not self.options.mixed_precision:
            return {}
        groups = bit_map(model)
        return {"bit_map": groups, "avg_block_bits": round(average_bits(model), 3)}

    # ---- the alternating search -------------------------------------------------------------------
    @torch.no_grad()
    def search(self, p: Product) -> None:
        """Alternate the two operands' step searches; set the quantizers' steps and the corrected bias."""
        o = self.options
        factors = torch.linspace(0.5, 1.2, o.candidates)
        grids = {"a": _grid(p.a_point), "b": _grid(p.b_point)}
        base = {"a": _base_scale(p.a_point, p.a),
                "b": _base_scale(p.b_point, p.b) if p.b_groups == 1 else _group_scale(p.b, p.b_groups, p.b_point)}
        x = {"a": p.a, "b": p.b}
        bias0 = None if p.bias is None else p.bias.detach().clone()
        full = _add_bias(p.op(p.a, p.b), bias0, p.channel_dims)
        target = Target.of(full, o.rank_pairs if p.ranking and o.ranking else None)
        groups = [target] if p.b_groups == 1 else [Target.of(t, None) for t in full.chunk(p.b_groups, dim=-1)]
        current = dict(base)
        quantized = {k: x[k] if base[k] is None else _fq(x[k], current[k], grids[k]) for k in "ab"}
        bias = bias0
        chosen: dict[str, Any] = {}
        for _ in range(o.rounds):
            before = dict(chosen)
            for side, other in (("b", "a"), ("a", "b")):  # weights (b of a Linear) first, as the paper
                if base[side] is None:
                    continue
                parts = groups if side == "b" else [target]
                scores: list[list[torch.Tensor]] = [[] for _ in parts]
                for chunk in _chunks(factors, target.per_candidate + x[side].numel()):
                    cand = chunk.to(base[side].device).view(-1, *[1] * x[side].dim()) * base[side]
                    q = _fq(x[side].unsqueeze(0), cand, grids[side])
                    out = p.op(q, quantized[other]) if side == "a" else p.op(quantized[other], q)
                    out = _add_bias(out, bias, p.channel_dims)
                    pieces = [out] if len(parts) == 1 else out.chunk(len(parts), dim=-1)
                    for i, (piece, part) in enumerate(zip(pieces, parts)):
                        scores[i].append(self.score(piece, part))
                best = [int(torch.cat(s).argmax()) for s in scores]
                chosen[side] = tuple(float(factors[i]) for i in best)
                if len(best) == 1:
                    current[side] = base[side] * factors[best[0]]
                else:  # one factor per group of weight rows
                    per_row = factors[best].repeat_interleave(base[side].shape[0] // len(best))
                    current[side] = base[side] * per_row.view_as(base[side]).to(base[side])
                quantized[side] = _fq(x[side], current[side], grids[side])
            if bias0 is not None and o.bias_correction:
                err = p.op(quantized["a"], quantized["b"]) - p.op(p.a, p.b)
                dims = tuple(range(err.dim() - p.channel_dims))
                bias = bias0 - err.mean(dim=dims).reshape(bias0.shape)
            if chosen == before:
                break
        for side, point in (("a", p.a_point), ("b", p.b_point)):
            if point is not None and base[side] is not None:
                scale = current[side].reshape(-1)
                point.quantizer.set_params(scale, torch.zeros_like(scale))
        if p.bias is not None and bias is not None:
            p.bias.copy_(bias)

    def score(self, out: torch.Tensor, target: "Target") -> torch.Tensor:
        """Per candidate: mean Pearson correlation with the float output over samples, minus gamma times
        the ranking loss when the target carries key pairs. `out` is [C, N, ...]."""
        c, n = out.shape[0], target.centered.shape[0]
        q = out.reshape(c, n, -1)
        m = q.shape[-1]
        mean = q.mean(-1)
        cov = torch.einsum("cnm,nm->cn", q, target.centered)  # the target is centered: no need to center q
        var = torch.einsum("cnm,cnm->cn", q, q) - m * mean.pow(2)
        s = (cov / (var.clamp_min(0) * target.energy).sqrt().clamp_min(1e-12)).mean(-1)
        if target.pairs is not None:
            diff = out @ target.pairs  # [C, ..., rows, pairs]: S^_i - S^_j
            hinge = diff.mul_(target.sign).neg_().add_(self.options.theta).clamp_(min=0)
            s = s - self.options.gamma * hinge.reshape(c, -1).mean(-1)
        return s

    # ---- mixed precision ----------------------------------------------------------------------------
    @torch.no_grad()
    def _mixed_precision(self, model: nn.Module) -> None:
        target = model.vitq.recipe.specs[Kind.WEIGHT].bits
        groups = list(block_groups(model))
        inside = {id(m) for _, g, _ in groups for m in g.modules()}
        for name, module in searchable(model):  # outside the blocks: the target width
            if id(module) not in inside:
                for product in products(name, module, model, self.options):
                    self.search(product)
        options: list[dict[int, tuple[float, dict]]] = []
        sizes: list[int] = []
        for gname, group, kind in groups:
            cap = capture.captured(group, self.name, gname)
            sens = sensitivity(group, kind, cap, self.name, self.options.mp_reduction)
            results = {}
            for bits in mp_candidates(target):
                snapshot_bits(group, bits)
                for name, module in searchable(group, prefix=gname):
                    for product in products(name, module, model, self.options):
                        self.search(product)
                out = group(*cap.call_args, **cap.kwargs)
                err = output_error(out, cap.output, self.options.mp_reduction)
                results[bits] = (sens * err, snapshot(group))
            options.append(results)
            sizes.append(sum(m.weight.numel() for m in group.modules() if isinstance(m, QuantWeight)))
        budget = target * sum(sizes)
        choice = pareto_choice([{b: r[0] for b, r in opt.items()} for opt in options], sizes, budget)
        recipe = model.vitq.recipe
        for (gname, group, _), opt, bits in zip(groups, options, choice):
            restore(group, opt[bits][1])
            recipe.overrides.append(Override(f"{gname}.*", None, {"bits": bits}))
        print_bit_map(bit_map(model), f"chosen (target {target} bits, average {average_bits(model):.3f})")


def searchable(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Modules holding a searched product: weighted layers and attention matmuls with quantized operands."""
    for name, m in model.named_modules(prefix=prefix):
        if isinstance(m, QuantWeight) and m.weight_quantizer.configured and m.input_quantizer.configured:
            yield name, m
        elif isinstance(m, QuantMatMul):
            yield name, m


def _softmax_sibling(model: nn.Module, name: str) -> QuantPoint | None:
    """The point quantizing the first operand of attn.v: the output of the QuantSoftmax in the same module."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    for child in parent.children():
        if isinstance(child, QuantSoftmax):
            return child.output_quantizer
    return None


def _configured(point: QuantPoint | None) -> QuantPoint | None:
    return point if point is not None and point.configured and point.mode == "quant" else None


def products(name: str, module: nn.Module, model: nn.Module, options: Liu21Options) -> list[Product]:
    """The searched product of one module, on its cached calibration inputs."""
    cap = capture.captured(module, Liu21.name, name)
    n = options.search_samples
    if isinstance(module, QuantMatMul):
        a, b = cap.args[0][:n], cap.args[1][:n]
        a_point = _configured(module.a_quantizer) if module.a_quantizer is not None else \
            _configured(_softmax_sibling(model, name))
        b_point = _configured(module.b_quantizer)
        if a_point is None and b_point is None:
            return []
        if module.transpose_b:
            return [Product(name, lambda x, y: x @ y.transpose(-2, -1), a, b, a_point, b_point, ranking=True)]
        return [Product(name, lambda x, y: x @ y, a, b, a_point, b_point)]
    x, w = cap.args[0][:n], module.weight.detach()
    if isinstance(module, nn.Conv2d):
        if module.input_quantizer.spec.per_channel:
            log.warning("%s: per-channel Conv2d input is not searched (kept at its max-based step)", name)
            return []
        x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
        w = w.reshape(w.shape[0], -1)
        if module.groups != 1:
            return []
    else:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    groups = 1
    if options.qkv_steps == 3 and name.endswith("qkv") and isinstance(module, nn.Linear):
        wq = module.weight_quantizer
        if not (wq.spec.per_channel and w.shape[0] % 3 == 0):
            raise ValueError(f"{name}: quant.qkv_steps=3 needs a per-channel qkv weight point to hold three steps "
                             "(liu21.yaml's override *qkv.weight per_channel: true); keep it or set quant.qkv_steps=1")
        groups = 3
    return [Product(name, linear_op, x, w, _configured(module.input_quantizer),
                    _configured(module.weight_quantizer), bias=module.bias, b_groups=groups)]


def linear_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., N, M, K] times w [..., O, K]^T -> [..., N, M, O], leading candidate dims on either side."""
    if w.dim() == 3:  # candidates of the weight: [C, O, K] against x [N, M, K]
        return torch.einsum("nmk,cok->cnmo", x, w)
    return x @ w.t()


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None, channel_dims: int) -> torch.Tensor:
    """out + bias in place (`out` is always a fresh product here)."""
    return out if bias is None else out.add_(bias)


def _base_scale(point: QuantPoint | None, x: torch.Tensor) -> torch.Tensor | None:
    """The point's max-based step, shaped to broadcast over x (the search's initialization)."""
    if point is None:
        return None
    q = point.quantizer
    scale = q.scale.detach().clone()
    return q._shape(scale, x) if q.per_channel and scale.numel() > 1 else scale.reshape([1] * x.dim())


def _group_scale(w: torch.Tensor, groups: int, point: QuantPoint) -> torch.Tensor:
    """Max-based step (the point's divisor) of each of `groups` equal blocks of weight rows, per row [O, 1]."""
    q = point.quantizer
    step = w.reshape(groups, -1).abs().amax(-1) / ((q.qmax - q.qmin) / 2 if q.half_span else q.qmax)
    return step.clamp_min(torch.finfo(w.dtype).tiny).repeat_interleave(w.shape[0] // groups)[:, None]


def _grid(point: QuantPoint | None) -> tuple[int, int] | None:
    return None if point is None else (point.quantizer.qmin, point.quantizer.qmax)


def _fq(x: torch.Tensor, scale: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Symmetric fake quantization (zero point 0) with a step that may carry leading candidate dims."""
    return torch.div(x, scale).round_().clamp_(grid[0], grid[1]).mul_(scale)


def _chunks(factors: torch.Tensor, per_candidate: int) -> Iterator[torch.Tensor]:
    size = max(1, _CHUNK_ELEMENTS // max(per_candidate, 1))
    yield from factors.split(size)


@dataclass
class Target:
    """The float output of one product, prepared once for scoring all candidates: centered per sample,
    its energy, and for the ranking loss the key-pair difference matrix and the float order."""

    centered: torch.Tensor  # [N, M]
    energy: torch.Tensor  # [N]
    pairs: torch.Tensor | None = None  # [keys, P]: +1 at key i, -1 at key j of each pair
    sign: torch.Tensor | None = None  # sign(S_i - S_j), [N, ..., rows, P]
    per_candidate: int = 0  # elements one candidate's scoring holds

    @classmethod
    def of(cls, out: torch.Tensor, rank_pairs: int | None) -> "Target":
        flat = out.reshape(out.shape[0], -1)
        centered = flat - flat.mean(-1, keepdim=True)
        t = cls(centered, centered.pow(2).sum(-1), per_candidate=out.numel())
        if rank_pairs is not None:
            t.pairs = pair_matrix(out.shape[-1], rank_pairs).to(out.device, out.dtype)
            t.sign = torch.sign(out @ t.pairs)
            t.per_candidate += t.sign.numel()
        return t


def pair_matrix(keys: int, count: int) -> torch.Tensor:
    """`count` distinct (i < j) key pairs (all of them if fewer), sampled once with a fixed seed, as a
    [keys, count] matrix D with S D = S_i - S_j for every row of scores S."""
    i, j = torch.triu_indices(keys, keys, offset=1)
    if i.numel() > count:
        keep = torch.randperm(i.numel(), generator=torch.Generator().manual_seed(0))[:count]
        i, j = i[keep], j[keep]
    d = torch.zeros(keys, i.numel())
    cols = torch.arange(i.numel())
    d[i, cols], d[j, cols] = 1.0, -1.0
    return d


def searched_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantPoint) and m.configured and hasattr(m.quantizer, "scale"):
            yield name, m.quantizer.scale
        elif isinstance(m, QuantWeight) and m.bias is not None:
            yield name + ".bias", m.bias
