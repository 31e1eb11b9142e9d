"""What a sensitivity analysis (`vitq.analyze`) found, as files and lines people act on: the CSV that a
later run reads its top-k points from, a bar chart per point, a printed top-10, and the recipe
overrides (a list, or one `quant.overrides=[...]` argument for train.py) that keep those points wider.

Reports are read by their fields only (`points`, `units`, `totals`), so this floor does not import
`vitq.sensitivity`, which imports it.
"""
from __future__ import annotations

import csv
import math
import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from ..files import written_atomically
from ..quant.quantizers import check_bits

COLUMNS = ("rank", "name", "kind", "unit", "bits", "gain_db", "only_sqnr", "all_but_sqnr", "only_metric",
           "all_but_metric")


class Report(Protocol):
    """The fields of `vitq.sensitivity.SensitivityReport` read here."""

    points: list[dict[str, Any]]
    units: list[dict[str, Any]]
    totals: dict[str, dict[str, float | None]]


def _ranked(report: Report) -> list[dict[str, Any]]:
    return sorted(report.points, key=lambda row: row["rank"])


# ---------------------------------------------------------------------------------------------------
# recipe overrides
# ---------------------------------------------------------------------------------------------------

def glob_escape(name: str) -> str:
    """A point name as an override pattern matching only itself (recipe patterns are fnmatch globs)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def keep_overrides(names: Sequence[str], bits: int | None = 8) -> list[dict[str, Any]]:
    """Recipe overrides (`quant.overrides` entries) putting each named point at `bits`, or float when
    bits is None: later overrides win, so appended to a recipe's they take precedence."""
    if bits is None:
        return [{"pattern": glob_escape(n), "enable": False} for n in names]
    check_bits(bits, "the points kept wider")
    return [{"pattern": glob_escape(n), "bits": bits} for n in names]


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _hydra_value(value: Any) -> str:
    """One value in Hydra's override grammar (strings quoted, so dots, globs and spaces survive)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        if "${" in value:
            raise ValueError(f"{value!r}: a '${{' would be read as an interpolation by Hydra")
        # backslashes escape only before a quote (or the closing one): double those, then escape the quotes
        escaped = re.sub(r'(\\*)("|\Z)', lambda m: m.group(1) * 2 + ('\\"' if m.group(2) else ""), value)
        return f'"{escaped}"'
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str) or not _KEY.match(k)]
        if bad:
            raise ValueError(f"override keys must be plain names for Hydra's syntax, got {bad}")
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    raise TypeError(f"cannot write a {type(value).__name__} ({value!r}) as a Hydra override value")


def hydra_override(overrides: Iterable[Mapping[str, Any]], shell: bool = False) -> str:
    """`quant.overrides=[...]`: one train.py argument setting the recipe's override list to `overrides`
    (it replaces the recipe's list, so pass the recipe's own overrides first to keep them). `shell`:
    quoted for a POSIX shell, where the braces and quotes would otherwise be expanded or eaten."""
    text = "quant.overrides=" + _hydra_value([dict(o) for o in overrides])
    return shlex.quote(text) if shell else text


# ---------------------------------------------------------------------------------------------------
# the CSV
# ---------------------------------------------------------------------------------------------------

def _cell(value: Any, column: str) -> str:
    """dB to 4 decimals; metrics (fractions) to 6, enough for one sample in 50,000; inf as `inf`."""
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.6f}" if column.endswith("metric") else f"{value:.4f}"
    return str(value)


def write_csv(report: Report, path: str | Path) -> Path:
    """sensitivity.csv: one row per point, highest gain first, written whole or not at all."""
    path = Path(path)
    with written_atomically(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in _ranked(report):
                writer.writerow({c: _cell(row.get(c), c) for c in COLUMNS})
    return path


def read_top(path: str | Path, k: int, narrower_than: int | None = None) -> list[str]:
    """The k top-ranked point names of a `write_csv` file, rank 1 first; with `narrower_than`, among the
    points quantized to fewer bits than that."""
    path = Path(path)
    if k < 0:
        raise ValueError(f"k must be 0 or more, got {k}")
    if not path.is_file():
        raise FileNotFoundError(f"no sensitivity CSV at {path}: write one with "
                                "vitq.report.sensitivity.write_csv(vitq.analyze(qmodel, batches), path)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("name", "rank") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(missing)} column (its columns: "
                             f"{', '.join(reader.fieldnames or []) or 'none'}); is it a sensitivity.csv?")
        rows = list(reader)
    ranked = []
    for i, row in enumerate(rows, start=2):
        try:
            rank, bits = int(row["rank"]), row.get("bits")
        except (TypeError, ValueError):
            raise ValueError(f"{path}, line {i}: rank {row['rank']!r} is not an integer") from None
        if narrower_than is None or not bits or int(float(bits)) < narrower_than:
            ranked.append((rank, row["name"]))
    return [name for _, name in sorted(ranked)[:k]]


# ---------------------------------------------------------------------------------------------------
# the printed table
# ---------------------------------------------------------------------------------------------------

def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def top_lines(report: Report, k: int = 10) -> list[str]:
    """The k points whose float recovers the most SQNR, as console lines (metrics in percent)."""
    rows = _ranked(report)[:k]
    has_metric = any(r.get("only_metric") is not None for r in report.points)
    everything = report.totals.get("all", {})
    head = f"all points quantized: SQNR {_db(everything.get('sqnr'))} dB"
    if has_metric:
        head += f", metric {_metric(everything.get('metric'))}"
        if "float" in report.totals:
            head += f" (float {_metric(report.totals['float'].get('metric'))})"
    width = max([len("point"), *(len(r["name"]) for r in rows)])
    kind_w = max([len("kind"), *(len(r["kind"]) for r in rows)])
    cols = f"{'rank':>4}  {'point':<{width}}  {'kind':<{kind_w}}  {'bits':>4}  {'gain dB':>8}  {'only dB':>8}  " \
           f"{'all-but dB':>10}"
    if has_metric:
        cols += f"  {'only %':>7}  {'all-but %':>9}"
    lines = [head, cols]
    for r in rows:
        line = (f"{r['rank']:>4}  {r['name']:<{width}}  {r['kind']:<{kind_w}}  {str(r['bits'] or 'fp'):>4}  "
                f"{_db(r['gain_db']):>8}  {_db(r['only_sqnr']):>8}  {_db(r['all_but_sqnr']):>10}")
        if has_metric:
            line += f"  {_metric(r['only_metric']):>7}  {_metric(r['all_but_metric']):>9}"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------------
# the plot
# ---------------------------------------------------------------------------------------------------

def short_name(name: str, unit: str | None) -> str:
    """The name inside its unit (`blocks.3.attn.qkv.input` -> `attn.qkv.input`): the colour says the unit."""
    return name[len(unit) + 1:] if unit and name.startswith(unit + ".") else name


def _finite(values: list[float]) -> tuple[list[float], list[bool]]:
    """Infinite values drawn at the edge of the finite ones (and marked), NaN at 0."""
    finite = [v for v in values if math.isfinite(v)]
    top = max([abs(v) for v in finite] or [1.0]) * 1.1 or 1.0
    drawn = [0.0 if math.isnan(v) else v if math.isfinite(v) else math.copysign(top, v) for v in values]
    return drawn, [math.isinf(v) for v in values]


def plot_sensitivity(report: Report, path: str | Path, title: str) -> Path:
    """sensitivity.png: per point (model order, coloured by unit) the gain of keeping it float, and the
    SQNR with everything but it quantized against the all-quantized level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.points
    units = list(dict.fromkeys(r["unit"] or "(no unit)" for r in rows))
    cmap = plt.get_cmap("tab20" if len(units) > 10 else "tab10")
    colours = [cmap(units.index(r["unit"] or "(no unit)") % cmap.N) for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(2, 1, figsize=(min(40.0, max(6.0, 0.22 * len(rows) + 2)), 7.5), sharex=True)
    gains, inf_gain = _finite([r["gain_db"] for r in rows])
    axes[0].bar(x, gains, color=colours)
    for i in (i for i, flag in enumerate(inf_gain) if flag):
        axes[0].annotate("inf", (i, gains[i]), ha="center", va="bottom", fontsize=6)
    axes[0].axhline(0.0, color="black", lw=0.6)
    axes[0].set(ylabel="gain (dB)", title="SQNR recovered by keeping the point float: SQNR(all but it) - SQNR(all)")
    but, _ = _finite([r["all_but_sqnr"] for r in rows])
    axes[1].bar(x, but, color=colours)
    everything = report.totals.get("all", {}).get("sqnr")
    if everything is not None and math.isfinite(everything):
        axes[1].axhline(everything, color="black", ls="--", lw=1, label=f"all quantized: {everything:.2f} dB")
        axes[1].legend(loc="lower right", fontsize=8)
        low = min([everything, *but])
        axes[1].set_ylim(bottom=low - max(1.0, 0.1 * abs(low)), top=max([everything, *but]) + 1.0)
    axes[1].set(ylabel="SQNR (dB)", title="output SQNR with every point but this one quantized")
    axes[1].set_xticks(x, [short_name(r["name"], r["unit"]) for r in rows], rotation=90,
                       fontsize=6 if len(rows) > 40 else 8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i % cmap.N)) for i in range(len(units))]
    axes[0].legend(handles, units, fontsize=7, ncol=min(len(units), 8), loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        with written_atomically(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
