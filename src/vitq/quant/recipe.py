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
import difflib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Mapping

from ..registry import Registry
from .points import CALIB_FLOWS, SCOPES, Kind, PointSpec
from .quantizers import get_grid

_SPEC_FIELDS = {f.name for f in dataclasses.fields(PointSpec)}
# per-kind sections; "activation" is the default for every non-weight kind
_SECTIONS = {"weight": (Kind.WEIGHT,), "activation": tuple(k for k in Kind.ALL if k != Kind.WEIGHT)}
_SECTIONS.update({k: (k,) for k in Kind.ALL if k != Kind.WEIGHT})
# the shorthand a recipe YAML interpolates into a section's bits (base/uniform.yaml): named in bits errors
_BITS_KEYS = {"weight": "quant.w_bits", "activation": "quant.a_bits", "softmax_output": "quant.attn_bits"}
# A recipe names a method and carries its switches and the model adapters' switches, and building one
# checks them; methods and adapters live on the floors above, so the binding layer (vitq.pipeline, which
# `import vitq` imports) fills these entries: "method class" (name -> class), "method" (name, options ->
# method), "adapter options" (() -> field defaults), "check adapter options" ((options, scope) -> None or raise);
# and vitq.recipes, which reads the recipe YAML files, "run keys" (() -> the keys of those files that the
# run reads, not the recipe: w_bits, calib, ...).
BINDINGS: Registry[Callable[..., Any]] = Registry("recipe binding", "import vitq: vitq.pipeline registers them")
_RECIPE_KEYS = frozenset({"name", "scope", "calib_flow", "method", "overrides", *_SECTIONS})


def _spec(values: Mapping[str, Any], where: str, base: PointSpec | None = None) -> PointSpec:
    unknown = set(values) - _SPEC_FIELDS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; valid keys: {sorted(_SPEC_FIELDS)}")
    merged = dataclasses.asdict(base) if base else {}
    merged.update(values)
    try:
        return PointSpec(**merged)
    except ValueError as e:
        section = where.removeprefix("quant.")
        if "bits=" in str(e) and section in _BITS_KEYS and "bits" in values:
            raise ValueError(f"{where}.bits={values['bits']!r} is out of range: use an integer between 2 and 16 "
                             f"(set it with {_BITS_KEYS[section]}=8)") from None
        raise ValueError(f"{where}: {e}") from None


def _check_keys(cfg: Mapping[str, Any], options: list[str], ignore: frozenset[str],
                adapter_options: tuple[str, ...] = ()) -> None:
    """A misspelt section (`weights:`) would silently leave its points at the defaults: refuse it."""
    known = _RECIPE_KEYS | set(options) | ignore | set(adapter_options)
    unknown = sorted(str(k) for k in cfg if k not in known)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, sorted(known), 1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"unknown recipe key(s) {', '.join(hints)}; a recipe has {', '.join(sorted(_RECIPE_KEYS))}"
                         + (f", the method's options {', '.join(options)}" if options else "")
                         + (f", the model adapters' options {', '.join(adapter_options)}" if adapter_options else "")
                         + f" and the run keys {', '.join(sorted(ignore))}")


@dataclass
class Override:
    pattern: str
    kind: str | None = None
    values: dict = field(default_factory=dict)
    optional: bool = False  # may match nothing (a pattern for some model families only, e.g. a classifier head)

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
    calib_flow: str = "float"  # what the points see while calibrating (`CALIB_FLOWS`)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}: choose one of {sorted(SCOPES)}")
        if self.calib_flow not in CALIB_FLOWS:
            raise ValueError(f"unknown calib_flow {self.calib_flow!r}: choose one of {', '.join(CALIB_FLOWS)}")
        self.method_impl()  # an unknown method or option fails here
        BINDINGS.get("check adapter options")(self.adapter_options, self.scope)  # e.g. an unknown detector_scope

    def method_impl(self):  # noqa: ANN201
        """The method object (hooks) this recipe names."""
        return BINDINGS.get("method")(self.method, self.options)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], run_keys: frozenset[str] | None = None) -> "Recipe":
        """Build from a plain mapping (a recipe YAML as Hydra composes it, or a dict). `run_keys` are read
        by the run, not the recipe (default: the recipe files' run keys, `vitq.recipes.RUN_KEYS`) and pass;
        any other unknown key is an error. The method's switches are read by name."""
        if run_keys is None:
            run_keys = BINDINGS.get("run keys")()
        build_method = BINDINGS.get("method")
        adapter_option_fields = BINDINGS.get("adapter options")
        method = str(cfg.get("method") or "ptq")
        impl = BINDINGS.get("method class")(method)
        _check_keys(cfg, impl.option_names(), frozenset(run_keys), tuple(adapter_option_fields()))
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
        impl = build_method(method, {k: cfg[k] for k in impl.option_names() if k in cfg})
        scope = str(cfg.get("scope", "matmul"))
        specs = impl.specs(specs, scope)
        overrides = []
        for i, entry in enumerate(cfg.get("overrides") or []):
            entry = dict(entry)
            if "pattern" not in entry:
                raise ValueError(f"quant.overrides[{i}] needs a 'pattern' (a glob on point names, e.g. 'head.*')")
            kind = entry.pop("kind", None)
            optional = entry.pop("optional", False)
            if not isinstance(optional, bool):
                raise ValueError(f"quant.overrides[{i}]: optional must be true or false, got {optional!r}")
            if kind is not None and kind not in Kind.ALL:
                raise ValueError(f"quant.overrides[{i}]: unknown kind {kind!r}; known kinds: {Kind.ALL}")
            pattern = entry.pop("pattern")
            _spec(entry, f"quant.overrides[{i}] ({pattern})")  # validate keys and bits now
            overrides.append(Override(pattern, kind, entry, optional))
        adapter_options = {k: cfg.get(k, default) for k, default in adapter_option_fields().items()}
        return cls(name=str(cfg.get("name", "custom")), scope=scope, specs=specs, overrides=overrides,
                   method=method, options=impl.option_dict(), adapter_options=adapter_options,
                   calib_flow=str(cfg.get("calib_flow") or "float"))

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scope": self.scope,
            "calib_flow": self.calib_flow,
            "method": self.method,
            **self.options,
            **self.adapter_options,
            **{k: dataclasses.asdict(s) for k, s in self.specs.items()},
            "overrides": [{"pattern": o.pattern, **({"kind": o.kind} if o.kind else {}),
                           **({"optional": True} if o.optional else {}), **o.values} for o in self.overrides],
        }

    def resolve(self, name: str, kind: str) -> PointSpec | None:
        """The spec for one point, or None when it stays float."""
        return self._resolve(name, kind)[0]

    def _resolve(self, name: str, kind: str) -> tuple[PointSpec | None, list[int]]:
        """The spec and the indices of the overrides that changed it."""
        spec = self.specs.get(kind) if kind in SCOPES[self.scope] else None
        applied = []
        for i, o in enumerate(self.overrides):
            if not o.matches(name, kind):
                continue
            if spec is None and not o.values.get("enable", False):
                continue  # out of scope: only an explicit `enable: true` brings a point in
            spec = _spec(o.values, f"override {o.pattern!r}", spec or self.specs.get(kind) or PointSpec())
            applied.append(i)
        if spec is None or not spec.enable:
            return None, applied
        only = get_grid(spec.quantizer).kinds
        if only is not None and kind not in only:
            raise ValueError(f"{name}: the {spec.quantizer} quantizer stands only at {', '.join(sorted(only))} "
                             f"points, not {kind}")
        return spec, applied

    def assign(self, names: list[str], kinds: list[str]) -> list[PointSpec | None]:
        """The spec of every point, refusing overrides that change nothing: a pattern that matches no point
        (almost always a typo), or one that matches only points out of scope without `enable: true`."""
        self.check_patterns(names, kinds)
        specs, used = [], set()
        for n, k in zip(names, kinds):
            spec, applied = self._resolve(n, k)
            specs.append(spec)
            used.update(applied)
        for i, o in enumerate(self.overrides):
            if i not in used and not o.optional:
                matched = sorted({k for n, k in zip(names, kinds) if o.matches(n, k)})
                raise ValueError(
                    f"recipe override pattern {o.pattern!r} matches only points outside scope={self.scope} "
                    f"(kinds {', '.join(matched)}), so it changes nothing: add enable: true to the override to "
                    "quantize them" + (", or use scope=full" if self.scope != "full" else ""))
        return specs

    def check_patterns(self, names: list[str], kinds: list[str]) -> None:
        """A pattern that matches no point is almost always a typo: say so."""
        for o in self.overrides:
            if not o.optional and not any(o.matches(n, k) for n, k in zip(names, kinds)):
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
