"""Recorded module calls, kept on the CPU and replayed a mini-batch at a time.

Block reconstruction records each unit's calls over the calibration batches (`record_unit`): the batch
tensors of every call, grouped by the call's form (`ArgCache`), read back without a concatenated copy
(`Rows`), and the float unit's outputs. A call's other arguments (e.g. mmdet's `hw_shape`) are its
layout, with each recorded tensor's place marked by a `Slot`. The calibration-time searches' input
records (`vitq.methods.capture`) are an `ArgCache` too, kept on the layer's device and read as one form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a `record_unit` hook: the rest of the forward is not needed."""


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """A unit's output as a list of tensors (a tensor, or a tuple/list/dict holding tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o)]
    return []


class Rows:
    """Tensors of equal trailing shape read as one tensor concatenated along dim 0, without copying them
    into one (which would hold every record twice while it is made)."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        self.starts = torch.tensor([0, *[int(p.shape[0]) for p in parts]]).cumsum(0)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.starts[-1]), *self.parts[0].shape[1:]))

    def is_floating_point(self) -> bool:
        return self.parts[0].is_floating_point()

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def index_select(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the concatenation, in that order (exactly `torch.cat(parts).index_select(0, index)`)."""
        if len(self.parts) == 1:
            return self.parts[0].index_select(0, index)
        which = torch.searchsorted(self.starts, index, right=True) - 1
        out = self.parts[0].new_empty((len(index), *self.parts[0].shape[1:]))
        for k in which.unique().tolist():
            at = (which == k).nonzero().squeeze(1)
            out[at] = self.parts[k].index_select(0, index[at] - self.starts[k])
        return out


class _Group:
    """Calls of one form: their batch tensors (read as concatenated along dim 0) and one layout."""

    def __init__(self, layout: Any, shapes: list[tuple], n_tensors: int) -> None:
        self.layout, self.shapes = layout, shapes
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(n_tensors)]
        self.tensors: list[Rows] = []
        self.size = 0

    def matches(self, layout: Any, shapes: list[tuple]) -> bool:
        return shapes == self.shapes and _same(layout, self.layout)


def _same(a: Any, b: Any) -> bool:
    """Equal argument layouts: the same structure, equal values, equal non-batch tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return a is b


class ArgCache:
    """Calls of one module recorded over many batches, on the CPU, grouped by form.

    Tensors whose first dimension is the batch are the per-sample records; everything else (e.g. mmdet's
    `hw_shape`) is the call's layout. Calls whose batch tensors have the same shapes past the batch axis
    and whose layouts are equal form one group, whose batch tensors read as one along dim 0 (`Rows`).
    Batches of one image size make one group; a detector's calibration batches padded to different sizes
    make one group per size, each replayed with its own layout. `order` is the group of every call."""

    def __init__(self, device: torch.device | str | None = "cpu", dtype: torch.dtype | None = None) -> None:
        """Records are copied to `device` (None: where they are), floating ones cast to `dtype` (None: kept)."""
        self.groups: list[_Group] = []
        self.order: list[int] = []
        self.device, self.dtype = device, dtype

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and x.is_floating_point() else x.dtype
        return x.detach().to(device=self.device or x.device, dtype=dtype, copy=True)

    def add(self, args: tuple, kwargs: dict, batch: int, new_form: bool = True) -> int:
        """Record one call; returns the index of its group, or -1 (nothing kept) for a call of a form not
        seen before when `new_form` is false."""
        found: list[torch.Tensor] = []

        def scan(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
                found.append(self._copy(x))
                return Slot(len(found) - 1)
            if isinstance(x, (list, tuple)):
                return type(x)(scan(v) for v in x)
            if isinstance(x, dict):
                return {k: scan(v) for k, v in x.items()}
            return x.detach().to(self.device or x.device) if isinstance(x, torch.Tensor) else x

        layout = (scan(tuple(args)), scan(dict(kwargs)))
        shapes = [(tuple(t.shape[1:]), t.dtype) for t in found]
        index = next((i for i, g in enumerate(self.groups) if g.matches(layout, shapes)), None)
        if index is None:
            if not new_form:
                return -1
            index = len(self.groups)
            self.groups.append(_Group(layout, shapes, len(found)))
        group = self.groups[index]
        for part, t in zip(group.parts, found):
            part.append(t)
        group.size += batch
        self.order.append(index)
        return index

    def finish(self) -> None:
        for g in self.groups:
            g.tensors = [Rows(p) for p in g.parts]
            g.parts = []

    @property
    def sizes(self) -> list[int]:
        return [g.size for g in self.groups]

    def nbytes(self) -> int:
        return sum(t.nbytes() for g in self.groups for t in g.tensors)

    def get(self, index: torch.Tensor, device: torch.device, other: "ArgCache | None" = None,
            mix: float = 0.0, group: int = 0) -> tuple[tuple, dict]:
        """The arguments of the samples `index` of one group, on `device`; with `other`, each element is
        taken from `other` (the quantized model's inputs, grouped alike) with probability `mix`."""
        g = self.groups[group]
        tensors = [t.index_select(index).to(device, non_blocking=True) for t in g.tensors]
        if other is not None:
            for i, t in enumerate(tensors):
                if t.is_floating_point():
                    o = other.groups[group].tensors[i].index_select(index).to(device, non_blocking=True)
                    tensors[i] = torch.where(torch.rand_like(t) < mix, o, t)

        args, kwargs = g.layout
        return fill(args, tensors, device), fill(kwargs, tensors, device)


def fill(layout: Any, tensors: list[torch.Tensor], device: torch.device | None = None) -> Any:
    """A recorded call's arguments: its layout with each `Slot` replaced by its tensor (the layout's own
    tensors moved to `device` where one is given)."""
    if isinstance(layout, Slot):
        return tensors[layout.i]
    if isinstance(layout, (list, tuple)):
        return type(layout)(fill(v, tensors, device) for v in layout)
    if isinstance(layout, dict):
        return {k: fill(v, tensors, device) for k, v in layout.items()}
    return layout.to(device) if isinstance(layout, torch.Tensor) and device is not None else layout


@dataclass(frozen=True)
class Slot:
    """Where the i-th recorded tensor goes back into a call's arguments."""

    i: int


def batch_size(args: tuple, kwargs: dict) -> int:
    for x in [*args, *kwargs.values()]:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            return int(x[0].shape[0])
    raise RuntimeError("a recorded module was called without a tensor argument; cannot cache its inputs")


@dataclass
class UnitData:
    """One unit's cached calibration records: float inputs, quantized-model inputs, float outputs, in
    groups of one input form (one group per padded image size; see `ArgCache`)."""

    fp_in: ArgCache | None = None
    q_in: ArgCache | None = None
    fp_out: list[list[Rows]] = field(default_factory=list)  # per group: the float output tensors

    @property
    def sizes(self) -> list[int]:
        """Samples per group."""
        return (self.fp_in if self.fp_in is not None else self.q_in).sizes

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def nbytes(self) -> int:
        caches = [c for c in (self.fp_in, self.q_in) if c is not None]
        return sum(c.nbytes() for c in caches) + sum(t.nbytes() for g in self.fp_out for t in g)


@torch.no_grad()
def record_unit(fp_model: nn.Module, fp_unit: nn.Module, qmodel: nn.Module | None, q_unit: nn.Module | None,
                batches: Iterable[Any], run_batch: Callable[[nn.Module, Any], Any], device: torch.device,
                want_fp_inputs: bool) -> UnitData:
    """Run the calibration batches up to the unit (and no further) and record what it sees."""
    data = UnitData(fp_in=ArgCache() if want_fp_inputs else None, q_in=ArgCache() if q_unit is not None else None)
    outs: list[list[torch.Tensor]] = []

    def fp_pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if data.fp_in is not None:
            data.fp_in.add(args, kwargs, batch_size(args, kwargs))

    def fp_post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        outs.append([t.detach().to("cpu", copy=True) for t in flat_tensors(out)])
        raise _Stop

    def q_pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        data.q_in.add(args, kwargs, batch_size(args, kwargs))
        raise _Stop

    hooks = [fp_unit.register_forward_pre_hook(fp_pre, with_kwargs=True),
             fp_unit.register_forward_hook(fp_post, with_kwargs=True)]
    if q_unit is not None:
        hooks.append(q_unit.register_forward_pre_hook(q_pre, with_kwargs=True))
    try:
        for batch in batches:
            batch = _to(batch, device)
            for model in (fp_model, qmodel) if qmodel is not None else (fp_model,):
                try:
                    run_batch(model, batch)
                except _Stop:
                    continue
                raise RuntimeError("the calibration forward never reached the reconstruction unit; check that "
                                   "run_batch runs the model's forward")
    finally:
        for h in hooks:
            h.remove()
    if not outs:
        raise RuntimeError("reconstruction got no calibration batches")
    order = (data.fp_in if data.fp_in is not None else data.q_in).order
    if data.fp_in is not None and data.q_in is not None and data.fp_in.order != data.q_in.order:
        raise RuntimeError("the float and the quantized model called a reconstruction unit with inputs of "
                           "different forms on the same batch")
    for g in range(max(order) + 1):
        parts = [outs[i] for i, k in enumerate(order) if k == g]
        if any(len(p) != len(parts[0]) or [t.shape[1:] for t in p] != [t.shape[1:] for t in parts[0]]
               for p in parts):
            raise RuntimeError("a reconstruction unit gave outputs of different forms for inputs of one form")
        data.fp_out.append([Rows(list(ts)) for ts in zip(*parts)])
    del outs
    for c in (data.fp_in, data.q_in):
        if c is not None:
            c.finish()
    return data
