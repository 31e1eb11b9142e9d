"""Per-quant-point sensitivity: which points cost a calibrated model the most output SQNR.

Mixed precision needs to know where the bits matter. Rather than a proxy (ranges, Hessians), this
measures it directly: the same batches run through the model once per configuration of the quant
points (each point alone, everything but each point, weights only, activations only, each unit alone
and everything but each unit), and every configuration's outputs are scored against one float
reference. A point's gain, SQNR(all but it) - SQNR(all), is how much keeping it float recovers; the
points with the highest gain are the ones to keep wider (`SensitivityReport.overrides`).

    report = vitq.analyze(qmodel, batches)          # batches: a list or a DataLoader, iterated per pass
    print("\\n".join(vitq.report.sensitivity.top_lines(report)))
    print(report.hydra_override(5, bits=8, shell=True))   # paste on the train.py command line
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .export import evaluating
from .models import units as model_units
from .quant.modules import QuantLayerNorm, QuantSoftmax
from .quant.ops import iter_points
from .quant.points import Kind, QuantPoint
from .quant.state import is_calibrated, quant_state
from .report.sensitivity import hydra_override as _hydra_override
from .report.sqnr import SQNRMeter
from .report.sensitivity import keep_overrides

Forward = Callable[[nn.Module, Any], Any]
Metric = Callable[[Any, Any], torch.Tensor]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A classification loader's (images, labels) batch or a bare tensor: the model sees the images."""
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def flatten_outputs(outputs: Any) -> torch.Tensor:
    """Every tensor of a model's outputs (a tensor, or tuple / list / dict of them, nested) as one float
    vector, so models with several outputs (a backbone's feature levels) get one SQNR."""
    leaves: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            leaves.append(value.detach().reshape(-1))
        elif isinstance(value, Mapping):
            for key in value:
                walk(value[key])
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)
        elif value is not None:
            raise TypeError(f"forward returned a {type(value).__name__} among its outputs: return a tensor, or "
                            "a tuple, list or dict of tensors (give analyze a forward= that picks them)")

    walk(outputs)
    if not leaves:
        raise ValueError("forward returned no tensor: give analyze a forward(model, batch) that returns the outputs")
    dtype = leaves[0].dtype if leaves[0].is_floating_point() else torch.float64
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype if leaf.is_floating_point() else torch.float64)
    device = leaves[0].device
    return torch.cat([leaf.to(device=device, dtype=dtype) for leaf in leaves])


def gain_db(all_but: float, everything: float) -> float:
    """SQNR(all but X) - SQNR(all); 0 where both are equal infinities (nothing to recover)."""
    if math.isinf(all_but) and all_but == everything:
        return 0.0
    return all_but - everything


def _rank_key(gain: float | None) -> float:
    return -math.inf if gain is None or math.isnan(gain) else gain


@dataclass
class SensitivityReport:
    """What `analyze` measured. `points`: one row per configured point in model order (name, kind, unit,
    bits, only_sqnr, all_but_sqnr, gain_db, only_metric, all_but_metric, rank; rank 1 is the highest
    gain); `units`: one row per unit holding a configured point; `totals`: `all`, `weights_only`,
    `activations_only` (sqnr, metric) and, with a metric, `float` (the reference's metric)."""

    points: list[dict[str, Any]]
    units: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, dict[str, float | None]] = field(default_factory=dict)
    batches: int = 0
    notes: list[str] = field(default_factory=list)  # where "off" is not the float point (see `_notes`)

    def ranked(self) -> list[dict[str, Any]]:
        return sorted(self.points, key=lambda row: row["rank"])

    def top(self, k: int = 10, narrower_than: int | None = None) -> list[str]:
        """The k point names with the highest gain, highest first; with `narrower_than`, among the points
        quantized to fewer bits than that (keeping an 8-bit point at 8 bits changes nothing)."""
        if k < 0:
            raise ValueError(f"k must be 0 or more, got {k}")
        rows = [r for r in self.ranked() if narrower_than is None or r["bits"] is None or r["bits"] < narrower_than]
        return [row["name"] for row in rows[:k]]

    def overrides(self, k: int, bits: int | None = 8) -> list[dict[str, Any]]:
        """Recipe overrides keeping the k highest-gain points narrower than `bits` at `bits` (None: float)."""
        return keep_overrides(self.top(k, narrower_than=bits), bits)

    def hydra_override(self, k: int, bits: int | None = 8, existing: Iterable[Mapping[str, Any]] = (),
                       shell: bool = False) -> str:
        """`quant.overrides=[...]` for train.py: the recipe's `existing` overrides first (a command-line
        list replaces the recipe's), then these. `shell`: quoted for a POSIX shell."""
        return _hydra_override([*existing, *self.overrides(k, bits)], shell=shell)


@dataclass
class _Config:
    group: str  # all | weights_only | activations_only | only | all_but | unit_only | unit_all_but
    target: str | None
    on: frozenset[str]


def _configs(names: list[str], kinds: dict[str, str], unit_of: dict[str, str | None],
             unit_names: list[str]) -> list[_Config]:
    every = frozenset(names)
    configs = [_Config("all", None, every)]
    weights = frozenset(n for n in names if kinds[n] == Kind.WEIGHT)
    configs += [_Config("weights_only", None, weights), _Config("activations_only", None, every - weights)]
    for unit in unit_names:
        inside = frozenset(n for n in names if unit_of[n] == unit)
        configs += [_Config("unit_only", unit, inside), _Config("unit_all_but", unit, every - inside)]
    for n in names:
        configs += [_Config("only", n, frozenset({n})), _Config("all_but", n, every - {n})]
    return configs


def _unit_of(name: str, unit_names: list[str]) -> str | None:
    """The innermost unit whose module holds the point (None: outside every unit, e.g. a final norm)."""
    holding = [u for u in unit_names if name.startswith(u + ".")]
    return max(holding, key=len) if holding else None


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _fingerprint(batch: Any) -> tuple | None:
    """Cheap identity of a batch, to refuse a loader that shuffles or augments between passes: every
    configuration must see the batches the reference saw."""
    t = _first_tensor(batch)
    return None if t is None else (tuple(t.shape), float(t.detach().double().sum()))


class _Passes:
    """Runs the batches through a model and scores its outputs against the reference pass."""

    def __init__(self, batches: Iterable[Any], forward: Forward, metric: Metric | None) -> None:
        self.batches, self.forward, self.metric = batches, forward, metric
        self.refs: list[torch.Tensor] = []
        self.prints: list[tuple | None] = []

    def _metric(self, outputs: Any, batch: Any, sums: list[float]) -> None:
        if self.metric is not None:
            values = torch.as_tensor(self.metric(outputs, batch)).detach().double().reshape(-1)
            sums[0] += float(values.sum())
            sums[1] += values.numel()

    def reference(self, model: nn.Module) -> float | None:
        """Keep the reference outputs; returns the reference's metric."""
        sums = [0.0, 0]
        for batch in self.batches:
            outputs = self.forward(model, batch)
            self.refs.append(flatten_outputs(outputs))
            self.prints.append(_fingerprint(batch))
            self._metric(outputs, batch, sums)
        if not self.refs:
            raise ValueError("batches yielded nothing: give analyze at least one batch")
        return sums[0] / sums[1] if self.metric is not None and sums[1] else None

    def score(self, model: nn.Module) -> tuple[float, float | None]:
        meter, sums, n = SQNRMeter(), [0.0, 0], 0
        for i, batch in enumerate(self.batches):
            if i >= len(self.refs) or not self._same(self.prints[i], _fingerprint(batch)):
                raise ValueError(f"batch {i} differs from the reference pass (or there are more batches): analyze "
                                 "iterates the batches once per configuration, so they must repeat exactly; pass a "
                                 "list, or a DataLoader with shuffle=False and deterministic transforms")
            outputs = self.forward(model, batch)
            flat = flatten_outputs(outputs)
            if flat.shape != self.refs[i].shape:
                raise ValueError(f"batch {i}: the outputs have {flat.numel()} values, the reference's "
                                 f"{self.refs[i].numel()}; SQNR needs outputs of a fixed size (give analyze a forward "
                                 "that returns fixed-size tensors, e.g. logits or backbone features)")
            meter.add(self.refs[i], flat)
            self._metric(outputs, batch, sums)
            n += 1
        if n != len(self.refs):
            raise ValueError(f"batches yielded {n} batches, the reference pass {len(self.refs)}: they must repeat")
        return meter.db, (sums[0] / sums[1] if self.metric is not None and sums[1] else None)

    @staticmethod
    def _same(a: tuple | None, b: tuple | None) -> bool:
        if a is None or b is None:
            return a is b
        return a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-6)


@contextlib.contextmanager
def _held(qmodel: nn.Module, fp_model: nn.Module | None) -> Iterator[None]:
    """Eval mode, integer kernels off; every point's mode, every kernel setting and the training flags
    come back afterwards, also when a pass raises."""
    modes = [(p, p.mode) for p in qmodel.modules() if isinstance(p, QuantPoint)]
    kernels = [(m, m.integer) for m in qmodel.modules() if isinstance(m, (QuantLayerNorm, QuantSoftmax))]
    try:
        for m, _ in kernels:  # the kernels need both neighbours quantized, which most configurations are not
            m.integer = False
        with contextlib.ExitStack() as stack:  # every module's training flag back, not only the roots'
            for model in (qmodel, fp_model):
                if model is not None:
                    stack.enter_context(evaluating(model))
            with torch.no_grad():
                yield
    finally:
        for p, mode in modes:
            p.mode = mode  # as it was, without set_mode's side effects (an observing point's batch count)
        for m, integer in kernels:
            m.integer = integer


class _Progress:
    """A rich bar over the configurations, naming the one running (nothing when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task("sensitivity", total=total)

    def running(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"sensitivity: {what}")

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def analyze(qmodel: nn.Module, batches: Iterable[Any], forward: Forward | None = None,
            fp_model: nn.Module | None = None, metric: Metric | None = None,
            progress: bool = True) -> SensitivityReport:
    """Score every configuration of `qmodel`'s configured points against a float reference (`fp_model`,
    else `qmodel` with every point off). `batches` is re-iterated once per configuration, so it must
    repeat (a list, or a DataLoader without shuffling); `forward(model, batch)` returns the outputs (a
    tensor or a tuple / list / dict of them), `metric(outputs, batch)` optional per-sample values whose
    mean is reported. Modes, integer kernels and training flags are restored afterwards."""
    if not is_calibrated(qmodel):
        raise ValueError("vitq.analyze needs a calibrated quantized model: call vitq.quantize(model, recipe) and "
                         "then vitq.calibrate(qmodel, forward_loop) first")
    if fp_model is qmodel:
        raise ValueError("fp_model is qmodel itself: pass the float model, or leave fp_model out (qmodel with "
                         "every point off is then the reference)")
    forward = forward or default_forward
    points = [(n, p) for n, p in iter_points(qmodel) if p.configured]
    if not points:
        raise ValueError("nothing to analyze: the recipe quantizes no point (is it fp32?)")
    names = [n for n, _ in points]
    kinds = {n: p.kind for n, p in points}
    all_units = [u for u, _ in model_units(qmodel)]
    unit_of = {n: _unit_of(n, all_units) for n in names}
    unit_names = [u for u in all_units if u in set(unit_of.values())]
    configs = _configs(names, kinds, unit_of, unit_names)
    passes = _Passes(batches, forward, metric)
    bar = _Progress(progress, len(configs) + 1)
    results: dict[tuple[str, str | None], tuple[float, float | None]] = {}
    try:
        with _held(qmodel, fp_model):
            if fp_model is None:
                for _, p in points:
                    p.set_mode("off")
            bar.running("float reference")
            float_metric = passes.reference(fp_model if fp_model is not None else qmodel)
            bar.done()
            for c in configs:
                bar.running(f"{c.group} {c.target or ''}".strip())
                for n, p in points:
                    p.set_mode("quant" if n in c.on else "off")
                results[c.group, c.target] = passes.score(qmodel)
                bar.done()
    finally:
        bar.stop()
    report = _report(points, unit_of, unit_names, results, float_metric, metric is not None, len(passes.refs))
    report.notes = _notes(qmodel, points)
    return report


def _notes(qmodel: nn.Module, points: list[tuple[str, QuantPoint]]) -> list[str]:
    """Where switching a point off does not give the float point back, so its gain understates it."""
    notes = []
    if quant_state(qmodel).float_state is not None:
        notes.append("the weights were changed by reconstruction or finetuning: a weight point switched off keeps "
                     "the changed weights, so weight points' gains understate what float weights would recover")
    noisy = [n for n, p in points if isinstance(getattr(p.quantizer, "noise", None), torch.Tensor)]
    if noisy:
        notes.append(f"{len(noisy)} point(s) carry NoisyQuant's noise with its denoising bias folded into the layer: "
                     "switched off, the bias stays, so those points are not float when off")
    return notes


def _report(points: list[tuple[str, QuantPoint]], unit_of: dict[str, str | None], unit_names: list[str],
            results: dict[tuple[str, str | None], tuple[float, float | None]], float_metric: float | None,
            has_metric: bool, n_batches: int) -> SensitivityReport:
    everything = results["all", None][0]
    rows = []
    for n, p in points:
        (only, only_m), (but, but_m) = results["only", n], results["all_but", n]
        rows.append({"name": n, "kind": p.kind, "unit": unit_of[n], "bits": getattr(p.quantizer, "bits", None),
                     "only_sqnr": only, "all_but_sqnr": but, "gain_db": gain_db(but, everything),
                     "only_metric": only_m, "all_but_metric": but_m, "rank": 0})
    for rank, row in enumerate(sorted(rows, key=lambda r: -_rank_key(r["gain_db"])), start=1):
        row["rank"] = rank  # sorted() is stable: equal gains keep model order
    units = []
    for u in unit_names:
        (only, only_m), (but, but_m) = results["unit_only", u], results["unit_all_but", u]
        units.append({"unit": u, "points": sum(unit_of[n] == u for n, _ in points), "only_sqnr": only,
                      "all_but_sqnr": but, "gain_db": gain_db(but, everything), "only_metric": only_m,
                      "all_but_metric": but_m})
    totals: dict[str, dict[str, float | None]] = {
        key: {"sqnr": results[key, None][0], "metric": results[key, None][1]}
        for key in ("all", "weights_only", "activations_only")}
    if has_metric:
        totals["float"] = {"sqnr": math.inf, "metric": float_metric}
    return SensitivityReport(points=rows, units=units, totals=totals, batches=n_batches)
