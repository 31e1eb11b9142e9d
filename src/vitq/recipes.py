"""Built-in recipes from plain Python: the same YAML files Hydra composes as `quant=<name>`.

    vitq.recipes()                                  # ['ema', 'fp32', 'fqvit', 'minmax', ...]
    vitq.recipe("repq", w_bits=4, a_bits=4)         # a Recipe
    vitq.quantize(model, "fqvit")                   # a name works wherever a recipe does
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .quant.recipe import BINDINGS, Recipe
from .registry import UnknownName

# keys of a recipe YAML that the run reads, not the recipe (bits shorthands, calibration, a checkpoint)
RUN_KEYS = frozenset({"w_bits", "a_bits", "attn_bits", "observer", "calib", "from_checkpoint", "finetune"})
BINDINGS.register("run keys", lambda: RUN_KEYS)

RECIPE_DIR = Path(__file__).parent / "conf" / "quant"


def recipes() -> list[str]:
    """Names of the built-in recipes (`src/vitq/conf/quant/*.yaml`)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _load(path: Path) -> DictConfig:
    """A YAML file with its Hydra defaults list applied (`base/<file>@_here_` and `_self_` entries)."""
    node = OmegaConf.load(path)
    defaults = list(node.pop("defaults", None) or ["_self_"])
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create()
    for entry in defaults:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
            continue
        name, _, package = str(entry).partition("@")
        if package != "_here_":
            raise ValueError(f"{path}: defaults entry {entry!r} is not supported outside Hydra (use name@_here_)")
        merged = OmegaConf.merge(merged, _load(path.parent / f"{name}.yaml"))
    return merged


def recipe_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The resolved recipe mapping for `name`, with top-level or dotted keys overridden."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UnknownName(f"unknown recipe {name!r}; known: {', '.join(recipes())}")
    node = _load(path)
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if OmegaConf.select(node, key, default="<missing>") == "<missing>":
            valid = ", ".join(sorted(str(k) for k in node.keys()))
            raise ValueError(f"recipe {name!r} has no key {key!r}; its keys: {valid}")
        OmegaConf.update(node, key, value, merge=True)
    return OmegaConf.to_container(node, resolve=True)


def recipe(name: str, **overrides: Any) -> Recipe:
    """A built-in recipe by name, e.g. `vitq.recipe("repq", w_bits=6, a_bits=6)`."""
    return Recipe.from_config(recipe_config(name, **overrides))
