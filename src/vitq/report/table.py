"""Result rows and console tables (rich)."""
from __future__ import annotations

from typing import Any, Iterable

from rich.console import Console
from rich.table import Table
from torch import nn

from ..quant.points import Kind
from ..quant.recipe import Recipe
from .ci import paired_bootstrap


def _bits(recipe: Recipe, kind: str) -> int | None:
    spec = recipe.specs.get(kind)
    return spec.bits if spec is not None and spec.enable else None


def unit_bits(model: nn.Module, unit: str | None) -> str:
    """'W8A8'-style bits of the first weighted layer inside a unit (patch embedding, head), 'fp' if float."""
    if unit is None:
        return "-"
    from ..quant.ops import iter_points

    found: dict[str, int | None] = {}
    for name, p in iter_points(model.get_submodule(unit)):
        key = "W" if p.kind == Kind.WEIGHT else "A" if p.kind == Kind.LINEAR_INPUT else None
        if key and key not in found:
            found[key] = p.quantizer.bits if p.configured and p.mode == "quant" else None
    return "".join(f"{k}{found.get(k) or 'fp'}" for k in ("W", "A"))


Comparison = tuple[float, float, float, float, float]  # fp, quant, delta, CI low, CI high (all x100)


def compare_means(fp: dict[str, Any], quant: dict[str, Any], metrics: tuple[str, ...]) -> dict[str, Comparison]:
    """Metrics that are the mean of per-sample outcomes: the means and the paired bootstrap of their
    difference (`Task.compare` of tasks whose metrics are not means, e.g. COCO AP, replaces this)."""
    out = {}
    for m in metrics:
        delta, low, high = paired_bootstrap(fp[m], quant[m])
        out[m] = (100.0 * float(fp[m].double().mean()), 100.0 * float(quant[m].double().mean()), delta, low, high)
    return out


def _adapter_setting(recipe: Recipe, model: nn.Module) -> tuple[str, dict]:
    """Words and columns for the switches of the adapters found in the model (e.g. a detector's scope)."""
    import dataclasses

    from ..models import find_roots

    words, cols = [], {}
    for _, _, adapter in find_roots(model):
        if adapter.Options is not None:
            words.append(adapter.describe(recipe.adapter_options))
            cols.update({f.name: recipe.adapter_options.get(f.name, f.default)
                         for f in dataclasses.fields(adapter.Options)})
    return "".join(f" {w}" for w in words if w), cols


def results_row(model_name: str, task_name: str, recipe: Recipe, metrics: tuple[str, ...], fp: dict[str, Any],
                quant: dict[str, Any], model: nn.Module, compare: Any = None, **info: Any) -> dict:
    """One comparable row: scope, bits and protocol details travel with every number, and each delta
    carries its paired 95% bootstrap interval over the evaluation samples. `compare(fp, quant, metrics)`
    turns the per-sample outcomes into (fp, quant, delta, low, high) per metric (default: means)."""
    from ..models import units

    names = [n for n, _ in units(model)]
    extra_setting, adapter_cols = _adapter_setting(recipe, model)
    row: dict[str, Any] = {
        "model": model_name, "task": task_name, "recipe": recipe.name, "method": recipe.method,
        "scope": recipe.scope, "setting": recipe.describe() + extra_setting, **adapter_cols,
        "w_bits": _bits(recipe, Kind.WEIGHT), "a_bits": _bits(recipe, Kind.LINEAR_INPUT),
        "attn_bits": _bits(recipe, Kind.SOFTMAX_OUTPUT),
        "patch_embed_bits": unit_bits(model, names[0] if names else None),
        "head_bits": unit_bits(model, names[-1] if names else None),
        "observer": getattr(recipe.specs.get(Kind.LINEAR_INPUT), "observer", None),
        "eval_samples": len(next(iter(fp.values()))) if fp else 0,
    }
    for m, (f, q, delta, low, high) in (compare or compare_means)(fp, quant, metrics).items():
        row.update({f"fp_{m}": f, f"quant_{m}": q, f"delta_{m}": delta, f"delta_{m}_ci": [low, high]})
    row.update(info)
    return row


def _console() -> Console:
    """Wide enough for the result table even when output is a file or a CI log."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def _fmt(v: Any) -> str:
    if v is None:
        return "fp"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def format_delta(row: dict, metric: str) -> str:
    low, high = row[f"delta_{metric}_ci"]
    return f"{row[f'delta_{metric}']:+.2f} [{low:+.2f}, {high:+.2f}]"


def print_results(rows: Iterable[dict], metrics: tuple[str, ...], console: Console | None = None) -> None:
    rows = list(rows)
    table = Table(title="float vs quantized (%; delta with paired 95% bootstrap interval)")
    cols = ["model", "task", "recipe", "setting", "calib imgs", "embed/head"]
    for c in cols:
        table.add_column(c)
    for m in metrics:
        for c in (f"fp {m}", f"quant {m}", f"delta {m} [95% CI]"):
            table.add_column(c, justify="right")
    for r in rows:
        cells = [r["model"], r["task"], r["recipe"], r["setting"], _fmt(r.get("calib_samples")),
                 f"{r['patch_embed_bits']}/{r['head_bits']}"]
        for m in metrics:
            cells += [_fmt(r[f"fp_{m}"]), _fmt(r[f"quant_{m}"]), format_delta(r, m)]
        table.add_row(*cells)
    (console or _console()).print(table)


def float_layers_line(layers: list[tuple[str, str]]) -> str | None:
    """One line naming the weighted layers that stay float because no adapter covers them."""
    if not layers:
        return None
    names = ", ".join(f"{n} ({t})" for n, t in layers[:4]) + (f", ... ({len(layers) - 4} more)" if len(layers) > 4 else "")
    return (f"{len(layers)} weighted layer(s) stay float under every recipe (no adapter covers them): {names}. "
            "Add a twin for their class in the model's adapter to quantize them (docs/adding.md)")


def print_points(points: list[dict], console: Console | None = None,
                 float_layers: list[tuple[str, str]] | None = None) -> None:
    table = Table(title=f"{len(points)} quant points")
    for c in ("name", "kind", "mode", "bits", "granularity", "channel_axis", "observer", "scale_min", "scale_max"):
        table.add_column(c)
    for p in points:
        table.add_row(p["name"], p["kind"], p["mode"], _fmt(p["bits"]), p["granularity"], str(p["channel_axis"]),
                      _fmt(p["observer"]), "" if p["scale_min"] is None else f"{p['scale_min']:.3g}",
                      "" if p["scale_max"] is None else f"{p['scale_max']:.3g}")
    console = console or _console()
    console.print(table)
    if line := float_layers_line(float_layers or []):
        console.print(f"[yellow]{line}[/yellow]")
