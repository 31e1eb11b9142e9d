"""Cached layer inputs for calibration-time searches (Liu et al.'s step search, NoisyQuant's noise search).

A search scores many candidate parameters of one layer. Running the model once per candidate is far
too slow, so the layer's float inputs (and, where asked, its float output) are kept during the
calibration forward pass and every candidate is scored on them. `attach` puts a forward hook on each
module; the hook records only while one of the module's quant points observes (the calibration pass,
when every point passes float values through), and keeps whole calls of the first call's form (e.g. one
image size) until `max_rows` rows along the first dimension are stored. The record is reconstruction's
`ArgCache`, kept on the layer's device in float32. State lives in the module's `__dict__`, never in its
state dict, keyed by its owner (a method or an add-on), so two searches on one layer keep separate
records. A method that reparameterizes a layer after calibration (RepQ-ViT's fold) maps the cached
inputs with `remap_inputs`, so later searches score the layer as it now is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..distributed import broadcast, rank_world
from ..quant.points import QuantPoint
from ..quant.records import ArgCache, batch_size, fill

_KEY = "_vitq_capture"


@dataclass
class Capture:
    """What one module saw: its calls' tensors (read concatenated along dim 0), the call's other
    arguments, and the output when `keep_output` is set."""

    max_rows: int
    keep_output: bool = False
    max_tokens: int | None = None  # or stop once this many vectors (rows x positions) are kept
    always: bool = False  # record in any mode (a replay of the calibration data through the quantized model)
    cache: ArgCache = field(default_factory=lambda: ArgCache(device=None, dtype=torch.float32))
    outputs: list[torch.Tensor] = field(default_factory=list)
    handle: Any = None

    @property
    def rows(self) -> int:
        return self.cache.groups[0].size if self.cache.groups else 0

    @property
    def full(self) -> bool:
        if self.max_tokens is not None and self.cache.groups:
            shape = self.cache.groups[0].shapes[0][0]  # the first tensor's shape past the batch axis
            return self.rows * math.prod(shape[:-1]) >= self.max_tokens
        return self.rows >= self.max_rows

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The forward hook itself: an object, not a closure, so a deep copy of the model records into
        its own copy of the capture."""
        self.record(module, args, kwargs, output)

    def record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.full or not (self.always or _observing(module)) or not any(isinstance(a, torch.Tensor) for a in args):
            return
        if self.cache.add(args, kwargs, batch_size(args, kwargs), new_form=not self.cache.groups) < 0:
            return  # a call of another form (e.g. another image size): keep the calls of the first form
        if self.keep_output and isinstance(output, torch.Tensor):
            self.outputs.append(output.detach().float().clone())

    @property
    def args(self) -> list[torch.Tensor]:
        """The recorded tensors, each concatenated over the calls (once: later reads share it)."""
        group = self.cache.groups[0]
        group.parts = [[torch.cat(p)] if len(p) > 1 else p for p in group.parts]
        return [p[0] for p in group.parts]

    def map_first(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.cache.groups[0].parts[0] = [fn(self.args[0])]

    @property
    def call_args(self) -> tuple:
        """Positional arguments for calling the module on the cached rows: the tensors, with the other
        arguments of the first call in their places (e.g. mmdet Swin's `hw_shape`)."""
        return fill(self.cache.groups[0].layout[0], self.args)

    @property
    def kwargs(self) -> dict[str, Any]:
        return fill(self.cache.groups[0].layout[1], self.args)

    @property
    def output(self) -> torch.Tensor | None:
        if len(self.outputs) > 1:
            self.outputs = [torch.cat(self.outputs)]
        return self.outputs[0] if self.outputs else None

    @property
    def empty(self) -> bool:
        return not self.cache.groups


def _observing(module: nn.Module) -> bool:
    return any(isinstance(p, QuantPoint) and p.mode in ("observe", "calibrate") for p in module.modules())


def attach(modules: Iterable[nn.Module], max_rows: int, owner: str, keep_output: bool = False,
           max_tokens: int | None = None, always: bool = False) -> None:
    """Start recording the inputs (and output) of each module during the next calibration pass, whole
    calls until `max_rows` rows (or `max_tokens` vectors along the last axis) are kept."""
    if max_rows < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"the search needs at least one cached sample, got max_rows={max_rows}")
    for module in modules:
        detach(module, owner)
        cap = Capture(max_rows, keep_output, max_tokens, always)
        cap.handle = module.register_forward_hook(cap, with_kwargs=True)
        module.__dict__.setdefault(_KEY, {})[owner] = cap


def captured(module: nn.Module, owner: str, what: str) -> Capture:
    """The module's record; fails, naming the fix, when calibration did not record it."""
    cap = module.__dict__.get(_KEY, {}).get(owner)
    if cap is None or cap.empty:
        raise RuntimeError(f"{what}: no cached calibration inputs; calibrate a model freshly made by "
                           "vitq.quantize (the search records layer inputs during that calibration pass)")
    return cap


@torch.no_grad()
def replayed_input(model: nn.Module, module: nn.Module, forward_loop: Callable[[nn.Module], Any], owner: str,
                   what: str) -> torch.Tensor:
    """The first input `module` receives (its calls of the first call's form) while `forward_loop(model)`
    feeds the data through the model as it now is (quantized: the searched layers before it in place)."""
    attach([module], 1 << 62, owner, always=True)
    try:
        forward_loop(model)
        return captured(module, owner, what).args[0]
    finally:
        detach(module, owner)


def remap_inputs(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The module's input coordinates changed (a reparameterization): map every cached first input."""
    for cap in module.__dict__.get(_KEY, {}).values():
        if not cap.empty:
            cap.map_first(fn)


def detach(module: nn.Module, owner: str) -> None:
    """Stop recording for this owner and drop what was kept."""
    caps = module.__dict__.get(_KEY, {})
    cap = caps.pop(owner, None)
    if cap is not None and cap.handle is not None:
        cap.handle.remove()
    if not caps:
        module.__dict__.pop(_KEY, None)


def detach_all(model: nn.Module, owner: str) -> None:
    for module in model.modules():
        detach(module, owner)


def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Under torch.distributed, give every rank rank 0's searched parameters (each rank searched on its
    own shard), so all ranks end identical; a no-op in one process."""
    if rank_world()[1] == 1:
        return
    for t in tensors:
        broadcast(t, 0)
