"""A method: hooks around calibration, the stages it needs, and its switches.

Generic code calls the hooks and never names a method. The trivial method (`ptq`) is plain
calibration with whatever calibrator the recipe names (minmax, ema, percentile, omse, quantile);
FQ-ViT, RepQ-ViT and later methods subclass `Method` in a file of their own.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import nn

if TYPE_CHECKING:
    from ..quant.points import PointSpec
    from ..quant.reconstruct import ReconstructOptions

METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available to recipes as `method: <cls.name>`."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type["Method"]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(METHODS)} "
                         "(or add one in src/vitq/methods/, see docs/adding.md)")
    return METHODS[name]


@dataclasses.dataclass
class NoOptions:
    """A method without switches."""


class Method:
    """Plain post-training calibration; subclasses override the hooks they need.

    Order of the hooks: `specs` (when the recipe is read) -> `prepare` (points placed, before any data)
    -> observing -> `after_observe` (searches over collected statistics) -> freeze, mode `quant` ->
    `after_freeze` (reparameterize, fold, switch kernels). A method that changes a point's layout records
    it in `model.vitq_recipe` (an override), so the saved recipe describes the final model. A reloaded
    checkpoint is placed from its stored recipe without `prepare`, then `after_load` runs.
    """

    name: ClassVar[str] = "ptq"
    stages: ClassVar[tuple[str, ...]] = ("calibrate",)  # stages between float and test
    Options: ClassVar[type] = NoOptions  # a dataclass; each field is a switch `quant.<field>`

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = self.parse_options(options or {})

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.Options))

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> Any:
        known = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"method {cls.name!r} has no option(s) {unknown}; its options: {sorted(known) or 'none'}")
        for key, value in options.items():
            default = known[key].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"quant.{key} must be true or false, got {value!r}")
        return cls.Options(**options)

    def option_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    # ---- hooks ------------------------------------------------------------------------------------
    def specs(self, specs: dict[str, "PointSpec"], scope: str) -> dict[str, "PointSpec"]:
        """Adjust the per-kind specs the recipe file gives (e.g. swap a kind's grid)."""
        return specs

    def prepare(self, model: nn.Module) -> None:
        """Points are placed from the recipe; change what the method needs before data is seen."""

    def after_observe(self, model: nn.Module) -> None:
        """Statistics are collected, nothing is frozen yet."""

    def after_freeze(self, model: nn.Module) -> None:
        """Every point has its parameters and is in `quant` mode."""

    def after_load(self, model: nn.Module) -> None:
        """A quantized checkpoint was loaded into the model."""

    # ---- block reconstruction (the `reconstruct` stage) ------------------------------------------
    def reconstruct_passes(self, model: nn.Module) -> list["ReconstructOptions"]:
        """The reconstruction passes the `reconstruct` stage runs on this calibrated model, in order."""
        return []

    def before_pass(self, model: nn.Module, index: int) -> None:
        """Pass `index` is about to run: switch what it needs (a fold, weight grids on or off)."""

    def after_reconstruct(self, model: nn.Module) -> None:
        """Every pass has run."""


register_method(Method)
