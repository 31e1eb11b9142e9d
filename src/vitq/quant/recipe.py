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

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}: choose one of {sorted(SCOPES)}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Recipe":
        """Build from a plain mapping (a `conf/quant/*.yaml` group); extra keys are ignored."""
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
        # FQ-ViT's switches, usable with any calibrator: PTF at LayerNorm inputs, log2 (LIS) probabilities
        if cfg.get("ptf") and Kind.NORM_INPUT in specs:
            specs[Kind.NORM_INPUT] = dataclasses.replace(specs[Kind.NORM_INPUT], quantizer="ptf")
        if cfg.get("lis") and Kind.SOFTMAX_OUTPUT in specs:
            specs[Kind.SOFTMAX_OUTPUT] = dataclasses.replace(specs[Kind.SOFTMAX_OUTPUT], quantizer="log2")
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
        return cls(name=str(cfg.get("name", "custom")), scope=str(cfg.get("scope", "matmul")),
                   specs=specs, overrides=overrides)

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scope": self.scope,
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
        only = {"log2": Kind.SOFTMAX_OUTPUT, "ptf": Kind.NORM_INPUT}.get(spec.quantizer)
        if only is not None and kind != only:
            raise ValueError(f"{name}: the {spec.quantizer} quantizer stands only at {only} points, not {kind}")
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
        """One line for result tables: scope and bit widths."""
        w = self.specs.get(Kind.WEIGHT)
        a = self.specs.get(Kind.LINEAR_INPUT)
        s = self.specs.get(Kind.SOFTMAX_OUTPUT)
        parts = [f"W{w.bits}" if w else "Wfp", f"A{a.bits}" if a else "Afp"]
        if s and a and (s.bits != a.bits or s.quantizer != "uniform"):
            parts.append(f"Attn{s.bits}" + ("-log2" if s.quantizer == "log2" else ""))
        n = self.specs.get(Kind.NORM_INPUT)
        extra = " +PTF" if n and n.quantizer == "ptf" and self.scope == "full" else ""
        return "/".join(parts) + f" {self.scope}{extra}"
