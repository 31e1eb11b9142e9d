"""Result rows and console tables (rich)."""
from __future__ import annotations

from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

from ..quant.points import Kind
from ..quant.recipe import Recipe


def _bits(recipe: Recipe, kind: str) -> int | None:
    spec = recipe.specs.get(kind)
    return spec.bits if spec is not None and spec.enable else None


def results_row(cfg: Any, recipe: Recipe, fp: dict, quant: dict, calib_seconds: float, source: str,
                integer: bool = False, calib_samples: int | None = None) -> dict:
    """One comparable row: the scope and bit widths travel with every number."""
    return {
        "model": cfg.model.name, "task": cfg.task.name, "recipe": recipe.name, "scope": recipe.scope,
        "w_bits": _bits(recipe, Kind.WEIGHT), "a_bits": _bits(recipe, Kind.LINEAR_INPUT),
        "attn_bits": _bits(recipe, Kind.SOFTMAX_OUTPUT),
        "observer": getattr(recipe.specs.get(Kind.LINEAR_INPUT), "observer", None),
        "setting": recipe.describe() + (" integer" if integer else ""),
        "calib_samples": calib_samples,
        "fp_top1": 100 * fp["fp/top1"], "fp_top5": 100 * fp["fp/top5"],
        "quant_top1": 100 * quant["quant/top1"], "quant_top5": 100 * quant["quant/top5"],
        "delta_top1": 100 * (quant["quant/top1"] - fp["fp/top1"]),
        "calib_seconds": round(calib_seconds, 2), "float_source": source,
    }


def _console() -> Console:
    """Wide enough for the result table even when output is a file or a CI log."""
    console = Console()
    return console if console.is_terminal else Console(width=180)


def _fmt(v: Any) -> str:
    if v is None:
        return "fp"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def print_results(rows: Iterable[dict], console: Console | None = None) -> None:
    table = Table(title="float vs quantized (top-1 / top-5, %)")
    cols = ["model", "task", "recipe", "setting", "observer", "fp_top1", "quant_top1", "delta_top1", "fp_top5",
            "quant_top5"]
    for c in cols:
        table.add_column(c, justify="right" if c.endswith(("bits", "top1", "top5")) else "left")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    (console or _console()).print(table)


def print_points(points: list[dict], console: Console | None = None) -> None:
    table = Table(title=f"{len(points)} quant points")
    for c in ("name", "kind", "mode", "bits", "granularity", "observer", "scale_min", "scale_max"):
        table.add_column(c)
    for p in points:
        table.add_row(p["name"], p["kind"], p["mode"], _fmt(p["bits"]), p["granularity"], _fmt(p["observer"]),
                      "" if p["scale_min"] is None else f"{p['scale_min']:.3g}",
                      "" if p["scale_max"] is None else f"{p['scale_max']:.3g}")
    (console or _console()).print(table)
