"""Recipes: which spec stands at which quant point.

A recipe gives one spec per kind of point, a scope (which kinds are quantized at all) and an ordered
list of overrides matched by glob pattern on point names, last match wins:

    Recipe.from_config({"scope": "matmul", "weight": {"bits": 4, "per_channel": True},
                        "activation": {"bits": 4},
                        "overrides": [{"pattern": "head.*", "bits": 8},
                                      {"pattern": "patch_embed.*", "enable": False}]})
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping

from .points import SCOPES, Kind, PointSpec
from .quantizers import get_grid

_SPEC_FIELDS = {f.name for f in dataclasses.fields(PointSpec)}
# per-kind sections; "activation" is the default for every non-weight kind
_SECTIONS = {"weight": (Kind.WEIGHT,), "activation": tuple(k for k in Kind.ALL if k != Kind.WEIGHT)}
_SECTIONS.update({k: (k,) for k in Kind.ALL if k != Kind.WEIGHT})


def _spec(values: Mapping[str, Any], where: str, base: PointSpec | None = None) -> PointSpec:
    unknown = set(values) - _SPEC_FIELDS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; valid keys: {sorted(_SPEC_FIELDS)}")
    merged = dataclasses.asdict(base) if base else {}
    merged.update(values)
    try:
        return PointSpec(**merged)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass
class Override:
    pattern: str
    kind: str | None = None
    values: dict = field(default_factory=dict)

    def matches(self, name: str, kind: str) -> bool:
        return fnmatchcase(name, self.pattern) and (self.kind is None or self.kind == kind)


@dataclass
class Recipe:
    name: str = "custom"
    scope: str = "matmul"
    specs: dict[str, PointSpec] = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)
    method: str = "ptq"  # a registered method (vitq.methods): its hooks run around calibration
    options: dict = field(default_factory=dict)  # the method's switches
    adapter_options: dict = field(default_factory=dict)  # the model adapters' switches (e.g. detector_scope)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}: choose one of {sorted(SCOPES)}")
        self.method_impl()  # an unknown method or option fails here
        from ..models.registry import check_adapter_options

        check_adapter_options(self.adapter_options)  # e.g. an unknown detector_scope fails here

    def method_impl(self):  # noqa: ANN201
        """The method object (hooks) this recipe names."""
        from ..methods import get_method  # methods build on vitq.quant; import on use

        return get_method(self.method)(self.options)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Recipe":
        """Build from a plain mapping (a recipe YAML as Hydra composes it, or a dict). Keys the recipe
        does not read (w_bits, a_bits, calib, ...) are ignored; the method's switches are read by name."""
        specs: dict[str, PointSpec] = {}
        for section in ("weight", "activation", *[k for k in Kind.ALL if k != Kind.WEIGHT]):
            if cfg.get(section) is None:
                continue
            for kind in _SECTIONS[section]:
                if section in ("weight", "activation"):
                    specs[kind] = _spec(dict(cfg[section]), f"quant.{section}")
                elif kind in specs:  # a per-kind section refines the activation spec
                    specs[kind] = _spec(dict(cfg[section]), f"quant.{section}", specs[kind])
                else:  # or stands on its own when it gives its bits
                    spec = _spec(dict(cfg[section]), f"quant.{section}")  # validates the keys either way
                    if cfg[section].get("bits") is not None:
                        specs[kind] = spec
        from ..methods import get_method

        method = str(cfg.get("method") or "ptq")
        impl = get_method(method)
        impl = impl({k: cfg[k] for k in impl.option_names() if k in cfg})
        scope = str(cfg.get("scope", "matmul"))
        specs = impl.specs(specs, scope)
        overrides = []
        for i, entry in enumerate(cfg.get("overrides") or []):
            entry = dict(entry)
            if "pattern" not in entry:
                raise ValueError(f"quant.overrides[{i}] needs a 'pattern' (a glob on point names, e.g. 'head.*')")
            kind = entry.pop("kind", None)
            if kind is not None and kind not in Kind.ALL:
                raise ValueError(f"quant.overrides[{i}]: unknown kind {kind!r}; known kinds: {Kind.ALL}")
            pattern = entry.pop("pattern")
            _spec(entry, f"quant.overrides[{i}] ({pattern})")  # validate keys and bits now
            overrides.append(Override(pattern, kind, entry))
        from ..models import adapter_option_fields

        adapter_options = {k: cfg.get(k, default) for k, default in adapter_option_fields().items()}
        return cls(name=str(cfg.get("name", "custom")), scope=scope, specs=specs, overrides=overrides,
                   method=method, options=impl.option_dict(), adapter_options=adapter_options)

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scope": self.scope,
            "method": self.method,
            **self.options,
            **self.adapter_options,
            **{k: dataclasses.asdict(s) for k, s in self.specs.items()},
            "overrides": [{"pattern": o.pattern, **({"kind": o.kind} if o.kind else {}), **o.values}
                          for o in self.overrides],
        }

    def resolve(self, name: str, kind: str) -> PointSpec | None:
        """The spec for one point, or None when it stays float."""
        spec = self.specs.get(kind) if kind in SCOPES[self.scope] else None
        for o in self.overrides:
            if not o.matches(name, kind):
                continue
            if spec is None and not o.values.get("enable", False):
                continue  # out of scope: only an explicit `enable: true` brings a point in
            spec = _spec(o.values, f"override {o.pattern!r}", spec or self.specs.get(kind) or PointSpec())
        if spec is None or not spec.enable:
            return None
        only = get_grid(spec.quantizer).kinds
        if only is not None and kind not in only:
            raise ValueError(f"{name}: the {spec.quantizer} quantizer stands only at {', '.join(sorted(only))} "
                             f"points, not {kind}")
        return spec

    def check_patterns(self, names: list[str], kinds: list[str]) -> None:
        """A pattern that matches no point is almost always a typo: say so."""
        for o in self.overrides:
            if not any(o.matches(n, k) for n, k in zip(names, kinds)):
                sample = ", ".join(names[:4])
                raise ValueError(
                    f"recipe override pattern {o.pattern!r}"
                    + (f" (kind {o.kind})" if o.kind else "")
                    + f" matches no quant point; point names look like: {sample}, ..."
                    " (see vitq.summary(model) or `python train.py stage=summary`)"
                )

    def describe(self) -> str:
        """One line for result tables: bit widths, scope and every grid other than uniform."""
        w = self.specs.get(Kind.WEIGHT)
        a = self.specs.get(Kind.LINEAR_INPUT)
        s = self.specs.get(Kind.SOFTMAX_OUTPUT)
        parts = [f"W{w.bits}" if w else "Wfp", f"A{a.bits}" if a else "Afp"]
        if s and a and (s.bits != a.bits or s.quantizer != "uniform"):
            parts.append(f"Attn{s.bits}" + ("" if s.quantizer == "uniform" else f"-{s.quantizer}"))
        grids = sorted({f"+{sp.quantizer}" for k, sp in self.specs.items()
                        if sp.quantizer != "uniform" and k in SCOPES[self.scope] and k != Kind.SOFTMAX_OUTPUT})
        return " ".join(["/".join(parts), self.scope, *grids])
