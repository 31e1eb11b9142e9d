"""Adapters: one object per model family, applied wherever that family appears inside a model.

An adapter names the float classes of its family (`roots`), the quantizable twins of its modules, its
ordered reconstruction units, and its LayerNorm -> consumer pairs. `rewrite` finds every outermost
submodule that is a root of some adapter (the model itself, or e.g. a detector's backbone), converts the
modules under it in place, and wires each LayerNorm to the input quantizer of the layer it feeds.
The layout of each point (its channel axis) is set by the twin that creates it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from torch import nn

from ..quant.modules import QuantConv2d, QuantLayerNorm, QuantLinear
from ..quant.points import SCOPES, Kind, QuantPoint
from ..registry import Registry

BASE_TWINS: dict[type[nn.Module], type] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.LayerNorm: QuantLayerNorm,
}


class UnsupportedModelError(TypeError):
    pass


@dataclass(frozen=True)
class NormPair:
    """A LayerNorm and the Linear its output feeds (and nothing else)."""

    norm_name: str
    norm: nn.Module
    consumer_name: str
    consumer: nn.Module


ATTENTION_POINTS = ("operands", "qkv_output")


@dataclass
class AttentionOptions:
    """Where q, k and v are quantized: as the operands of the two attention matmuls (q and k of q k^T, v of
    P v: PTQ4ViT, RepQ-ViT, I&S-ViT), or once, as the qkv layer's output (FQ-ViT's one per-tensor `qact1`)."""

    attention_points: str = "operands"

    def __post_init__(self) -> None:
        if self.attention_points not in ATTENTION_POINTS:
            raise ValueError(f"quant.attention_points={self.attention_points!r} is unknown: choose one of "
                             f"{', '.join(ATTENTION_POINTS)}")


def place_qkv_points(attn: nn.Module, options: Mapping[str, Any]) -> None:
    """Keep one of the two layouts `AttentionOptions` names on an attention twin (qkv, matmul_qk, matmul_av),
    so every tensor is quantized once."""
    if options.get("attention_points", "operands") == "qkv_output":
        attn.matmul_qk.a_quantizer = attn.matmul_qk.b_quantizer = attn.matmul_av.b_quantizer = None
    else:
        attn.qkv.output_quantizer = None


class Adapter:
    """One model family. Subclasses set `family`, `roots`, `twins` and implement the two listings."""

    family: str = "?"
    roots: tuple[type[nn.Module], ...] = ()
    twins: dict[type[nn.Module], type] = {}
    # The adapter's switches, a dataclass: each field is a `quant.<field>` key kept in the recipe
    # (`Recipe.adapter_options`), e.g. how much of a detector around its backbone is quantized.
    Options: type | None = None

    def modules(self, root: nn.Module, options: Mapping[str, Any]) -> Iterable[nn.Module]:
        """The modules under root that are converted (all by default); the others stay float."""
        return root.modules()

    def describe(self, options: Mapping[str, Any]) -> str:
        """Words for the result row's setting when a switch changes what is quantized ('' for none)."""
        return ""

    def units(self, root: nn.Module) -> list[str]:
        """Names (relative to root) of the ordered reconstruction units: embedding, blocks, head."""
        raise NotImplementedError

    def norm_pairs(self, root: nn.Module) -> list[tuple[str, str]]:
        """(LayerNorm name, consumer Linear name) relative to root, for every LayerNorm that feeds exactly
        one Linear (used by reparameterization and the integer LayerNorm)."""
        raise NotImplementedError

    def output_norms(self, root: nn.Module) -> list[tuple[str, str]]:
        """(LayerNorm, point) pairs that are not reparameterization pairs: the integer LayerNorm produces the
        codes of the named point (a QuantPoint, or a module's `input_quantizer`), as FQ-ViT's `QIntLayerNorm`
        feeds the QAct after it: a ViT's final LayerNorm into the head's input when the head reads the class
        token; Swin's stage boundaries under `quant.stage_points`."""
        return []

    def twin_for(self, module: nn.Module) -> type | None:
        cls = type(module)
        return self.twins.get(cls) or BASE_TWINS.get(cls)


ADAPTERS: Registry[Adapter] = Registry("model family", "add an adapter in src/vitq/models/, see docs/adding.md")


def register_adapter(adapter: Adapter) -> Adapter:
    """Adapters are tried in the order they were registered, keyed by their family."""
    return ADAPTERS.register(adapter.family, adapter)


def adapter_for(module: nn.Module) -> Adapter | None:
    for adapter in ADAPTERS.values():
        if isinstance(module, adapter.roots):
            return adapter
    return None


def find_roots(model: nn.Module) -> list[tuple[str, nn.Module, Adapter]]:
    """Every outermost submodule some adapter handles, as (name, module, adapter), in model order."""
    found: list[tuple[str, nn.Module, Adapter]] = []
    for name, module in model.named_modules():
        if any(p == "" or name == p or name.startswith(p + ".") for p, _, _ in found):
            continue  # inside a root already found
        adapter = adapter_for(module)
        if adapter is not None:
            found.append((name, module, adapter))
    return found


def _roots_or_raise(model: nn.Module) -> list[tuple[str, nn.Module, Adapter]]:
    roots = find_roots(model)
    if not roots:
        known = ", ".join(sorted(f"{c.__module__}.{c.__name__}" for a in ADAPTERS.values() for c in a.roots))
        raise UnsupportedModelError(
            f"vitq has no adapter for {type(model).__module__}.{type(model).__name__} or any of its submodules. "
            f"Known model classes: {known}. Add one in src/vitq/models/ (see docs/adding.md)."
        )
    return roots


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def adapter_option_fields() -> dict[str, Any]:
    """Every registered adapter's switches: field name -> default."""
    import dataclasses

    return {f.name: f.default for a in ADAPTERS.values() if a.Options is not None for f in dataclasses.fields(a.Options)}


def check_adapter_options(options: Mapping[str, Any], scope: str = "full") -> None:
    """Build each adapter's Options from `options`, so a bad value fails when the recipe is read."""
    import dataclasses

    if options.get("attention_points") == "qkv_output" and Kind.LINEAR_OUTPUT not in SCOPES[scope]:
        raise ValueError(f"quant.attention_points=qkv_output quantizes q, k and v at the qkv layer's output, a "
                         f"linear_output point that scope={scope} leaves float, so they would not be quantized at all: "
                         "use quant.scope=full, or quant.attention_points=operands")

    for a in ADAPTERS.values():
        if a.Options is not None:
            names = {f.name for f in dataclasses.fields(a.Options)}
            a.Options(**{k: v for k, v in options.items() if k in names})


def rewrite(model: nn.Module, options: Mapping[str, Any] | None = None) -> list[str]:
    """Convert every module of every adapted family in place; returns the families found. `options`
    holds the adapters' switches (defaults for those not given)."""
    roots = _roots_or_raise(model)
    options = {**adapter_option_fields(), **(options or {})}
    for _, root, adapter in roots:
        for module in list(adapter.modules(root, options)):
            twin = adapter.twin_for(module)
            if twin is not None:
                twin.convert(module)
        for module in root.modules():  # twins that wire themselves to their (now converted) children
            hook = getattr(module, "after_rewrite", None)
            if callable(hook):
                hook(options)
        for norm_name, consumer_name in [*adapter.norm_pairs(root), *adapter.output_norms(root)]:
            consumer = root.get_submodule(consumer_name)
            root.get_submodule(norm_name).feeds(consumer if isinstance(consumer, QuantPoint)
                                                else consumer.input_quantizer)
    return [adapter.family for _, _, adapter in roots]


def quantize_after_activation(fc1: nn.Module | None) -> None:
    """An MLP's first layer has no output point: its output is quantized after the activation, as the next
    layer's input (FQ-ViT's `Mlp.forward`: fc1 -> GELU -> qact), so a tensor is never quantized twice."""
    if isinstance(fc1, QuantLinear):
        fc1.output_quantizer = None


def norm_pairs(model: nn.Module) -> Iterator[NormPair]:
    """Every adapter's LayerNorm -> consumer pairs, with names relative to `model`."""
    for prefix, root, adapter in find_roots(model):
        for norm_name, consumer_name in adapter.norm_pairs(root):
            yield NormPair(_join(prefix, norm_name), root.get_submodule(norm_name),
                           _join(prefix, consumer_name), root.get_submodule(consumer_name))


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every adapter's reconstruction units in model order, with names relative to `model`."""
    return [(_join(prefix, name), root.get_submodule(name))
            for prefix, root, adapter in find_roots(model) for name in adapter.units(root)]


def family_of(model: nn.Module) -> str:
    """The family of the first adapted (sub)module; raises UnsupportedModelError if there is none."""
    return _roots_or_raise(model)[0][2].family
