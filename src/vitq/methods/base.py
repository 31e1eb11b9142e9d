"""A method: hooks around calibration, the stages it needs, and its switches.

Generic code calls the hooks and never names a method. The trivial method (`ptq`) is plain
calibration with whatever calibrator the recipe names (minmax, ema, percentile, omse, quantile);
FQ-ViT, RepQ-ViT and later methods subclass `Method` in a file of their own.

An add-on (`Addon`) is a technique that stacks on any method (NoisyQuant's input noise): its switches
join every method's `Options`, and when its switch is on, its hooks run after the method's.
`build_method` gives the method with its active add-ons; recipes build their method through it.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from torch import nn

from ..registry import Registry

if TYPE_CHECKING:
    from ..quant.points import PointSpec
    from ..quant.reconstruct import ReconstructOptions

METHODS: Registry[type["Method"]] = Registry("method", "or add one in src/vitq/methods/, see docs/adding.md")
ADDONS: Registry[type["Addon"]] = Registry("add-on")


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available to recipes as `method: <cls.name>`."""
    if "own_options" not in cls.__dict__:  # the options the class itself declares (or inherits)
        own = cls.__dict__.get("Options")
        cls.own_options = own if own is not None else getattr(cls, "own_options", cls.Options)
    METHODS.register(cls.name, cls)
    cls.Options = _with_addon_fields(cls)
    return cls


def register_addon(cls: type["Addon"]) -> type["Addon"]:
    """Class decorator: an add-on whose switches (`cls.Options`) every method accepts; active when the
    option named `cls.switch` is true."""
    ADDONS.register(cls.name, cls)
    for method in METHODS.values():
        method.Options = _with_addon_fields(method)
    return cls


def _with_addon_fields(method: type["Method"]) -> type:
    """The method's own options dataclass extended by every registered add-on's fields."""
    own = method.own_options
    names = {f.name for f in dataclasses.fields(own)}
    extra = []
    for addon in ADDONS.values():
        hints = typing.get_type_hints(addon.Options)
        for f in dataclasses.fields(addon.Options):
            if f.name in names:
                raise ValueError(f"add-on {addon.name!r} option {f.name!r} clashes with method {method.name!r}")
            names.add(f.name)
            extra.append((f.name, hints[f.name], dataclasses.field(default=f.default)))
    if not extra:
        return own
    return dataclasses.make_dataclass(own.__name__, extra, bases=(own,))


def get_method(name: str) -> type["Method"]:
    return METHODS.get(name)


@dataclasses.dataclass
class NoOptions:
    """A method without switches."""


class Method:
    """Plain post-training calibration; subclasses override the hooks they need.

    Order of the hooks: `specs` (when the recipe is read) -> `prepare` (points placed, before any data)
    -> observing -> `after_observe` (searches over collected statistics) -> freeze, mode `quant` ->
    `after_freeze` (reparameterize, fold, switch kernels) -> `replay` (searches that run the calibration data
    through the model again, each layer after the layers before it are final). A method that changes a
    point's layout records it in `model.vitq.recipe` (an override), so the saved recipe describes the final
    model. A reloaded checkpoint is placed from its stored recipe without `prepare`, then `after_load` runs.
    """

    name: ClassVar[str] = "ptq"
    stages: ClassVar[tuple[str, ...]] = ("calibrate",)  # stages between float and test
    Options: ClassVar[type] = NoOptions  # a dataclass; each field is a switch `quant.<field>`
    # grids the method itself places, and the override that makes those points uniform (named by the export)
    grid_switches: ClassVar[dict[str, str]] = {}

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

    def calibrates_in_order(self) -> bool:
        """True when calibration must see every batch in one process's order (a module acts on the last
        batch): under DDP every process then feeds the whole set instead of a shard."""
        return False

    def after_observe(self, model: nn.Module) -> None:
        """Statistics are collected, nothing is frozen yet."""

    def after_freeze(self, model: nn.Module) -> None:
        """Every point has its parameters and is in `quant` mode."""

    def replay(self, model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> None:
        """After `after_freeze`: `forward_loop(model)` feeds the calibration data again (as often as the
        method needs), for searches that must see the outputs of the already-searched layers before them."""

    def before_load(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Points are placed from a checkpoint's recipe; add what the method created during calibration
        (wrappers, buffers) so that the checkpoint's state dict loads strictly."""

    def after_load(self, model: nn.Module) -> None:
        """A quantized checkpoint was loaded into the model."""

    def describe_model(self, model: nn.Module) -> dict[str, Any]:
        """Extra result-row columns about the calibrated model (e.g. a chosen bit map)."""
        return {}

    # ---- block reconstruction (the `reconstruct` stage) ------------------------------------------
    def reconstruct_passes(self, model: nn.Module) -> list["ReconstructOptions"]:
        """The reconstruction passes the `reconstruct` stage runs on this calibrated model, in order."""
        return []

    def before_pass(self, model: nn.Module, index: int) -> None:
        """Pass `index` is about to run: switch what it needs (a fold, weight grids on or off)."""

    def after_reconstruct(self, model: nn.Module) -> None:
        """Every pass has run."""


register_method(Method)


class Addon:
    """A technique that stacks on any method, switched on by the boolean option `switch`.

    Its hooks are those of `Method` (same order, same meaning) and run after the method's own. It reads
    the method's parsed options, which hold the add-on's fields too.
    """

    name: ClassVar[str] = "?"
    switch: ClassVar[str] = "?"  # the boolean option that turns the add-on on
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    def specs(self, specs: dict[str, "PointSpec"], scope: str) -> dict[str, "PointSpec"]:
        return specs

    def prepare(self, model: nn.Module) -> None:
        pass

    def after_observe(self, model: nn.Module) -> None:
        pass

    def calibrates_in_order(self) -> bool:
        return False

    def after_freeze(self, model: nn.Module) -> None:
        pass

    def replay(self, model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> None:
        pass

    def before_load(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        pass

    def after_load(self, model: nn.Module) -> None:
        pass

    def describe_model(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def after_reconstruct(self, model: nn.Module) -> None:
        """The method's reconstruction passes changed weights (runs after the method's own hook)."""


class WithAddons(Method):
    """A method and its active add-ons behind the one `Method` interface: every hook runs the method's,
    then each add-on's. Name, stages and options are the method's."""

    def __init__(self, method: Method, addons: list[Addon]) -> None:
        self.method, self.addons = method, addons
        self.options = method.options
        self.name, self.stages, self.Options = method.name, method.stages, method.Options

    def option_dict(self) -> dict[str, Any]:
        return self.method.option_dict()

    def specs(self, specs: dict[str, "PointSpec"], scope: str) -> dict[str, "PointSpec"]:
        specs = self.method.specs(specs, scope)
        for addon in self.addons:
            specs = addon.specs(specs, scope)
        return specs

    def prepare(self, model: nn.Module) -> None:
        for hook in (self.method, *self.addons):
            hook.prepare(model)

    def calibrates_in_order(self) -> bool:
        return any(hook.calibrates_in_order() for hook in (self.method, *self.addons))

    def after_observe(self, model: nn.Module) -> None:
        for hook in (self.method, *self.addons):
            hook.after_observe(model)

    def after_freeze(self, model: nn.Module) -> None:
        for hook in (self.method, *self.addons):
            hook.after_freeze(model)

    def replay(self, model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> None:
        for hook in (self.method, *self.addons):
            hook.replay(model, forward_loop)

    def before_load(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        for hook in (self.method, *self.addons):
            hook.before_load(model, state)

    def after_load(self, model: nn.Module) -> None:
        for hook in (self.method, *self.addons):
            hook.after_load(model)

    def describe_model(self, model: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for hook in (self.method, *self.addons):
            out.update(hook.describe_model(model))
        return out

    def reconstruct_passes(self, model: nn.Module) -> list["ReconstructOptions"]:
        return self.method.reconstruct_passes(model)

    def before_pass(self, model: nn.Module, index: int) -> None:
        self.method.before_pass(model, index)

    def after_reconstruct(self, model: nn.Module) -> None:
        for hook in (self.method, *self.addons):
            hook.after_reconstruct(model)


def build_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """The named method with its options parsed, wrapped with the add-ons its options switch on."""
    method = get_method(name)(options)
    addons = [cls(method.options) for cls in ADDONS.values() if getattr(method.options, cls.switch)]
    return WithAddons(method, addons) if addons else method
