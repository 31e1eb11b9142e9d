"""What every benchmark section shares: paths, the small models, the pipeline runner and a table cell."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench"
FIGURES = ROOT / "docs" / "figures"
sys.path.insert(0, str(ROOT))

MODELS = {  # key -> (model config, task config, extra overrides)
    "mnist": ("vit_mnist", "mnist", []),
    "cifar": ("vit_cifar", "cifar10", ["task.root={cifar}", "task.eval_root={cifar_eval}"]),
}
BITS = [(8, 8), (6, 6), (4, 4)]


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def peak_mib() -> float:
    """This process's peak resident memory in MiB (VmHWM: unlike getrusage's maxrss, which Linux carries over
    exec from the process that started it, its own)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def compose(overrides: list[str]):  # noqa: ANN201
    from hydra import compose as hcompose, initialize_config_dir

    import vitq.engine.config  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose("config", overrides=overrides)


def shared(name: str) -> Path | None:
    from vitq.tasks.classification import find_shared_data

    return find_shared_data(name)


def _model_overrides(model_key: str) -> list[str] | None:
    """The config overrides of a small model and its task, None where its data is missing."""
    model, task, extra = MODELS[model_key]
    cifar, cifar_eval = shared("cifar10-small"), shared("cifar10-eval")
    if task == "cifar10" and (cifar is None or cifar_eval is None):
        print("skipping CIFAR: ../shared/data/cifar10-small or cifar10-eval not found")
        return None
    return [f"model={model}", f"task={task}", "logger=csv", *(e.format(cifar=cifar, cifar_eval=cifar_eval) for e in extra)]


def trained_model(model_key: str):  # noqa: ANN201
    """(task, float model) of a small model, in this process: the float model from the engine's cache (trained
    there on the first use)."""
    from vitq.engine.config import validate
    from vitq.engine.float_model import cache_dir, obtain_float_model
    from vitq.engine.run import make_trainer_factory
    from vitq.engine.tasks import get_task

    overrides = _model_overrides(model_key)
    if overrides is None:
        return None, None
    cfg = compose(overrides)
    settings = validate(cfg)
    task = get_task(str(settings.task["name"]))(settings.task, settings.model)
    model, _, _ = obtain_float_model(task, settings.model, settings.task, cache_dir(settings.cache_dir), settings.seed,
                                     make_trainer_factory(cfg, []))
    return task, model.eval()


def accuracy_rows(model_key: str, recipes: dict[str, list[str]],
                  on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The real pipeline (vitq.engine.run) per recipe; the float model is trained once and cached."""
    from vitq.engine.run import run

    base = _model_overrides(model_key)
    if base is None:
        return []
    rows = []
    for label, overrides in recipes.items():
        cfg = compose([*base, *overrides])
        start = time.perf_counter()
        row = run(cfg, OUT / model_key / label)
        row.update(label=label, seconds=round(time.perf_counter() - start, 1))
        rows.append(row)
        if on_row is not None:  # a long section keeps what it measured so far
            on_row(rows)
        print(f"{model_key} {label}: fp {row['fp_top1']:.2f} quant {row['quant_top1']:.2f} "
              f"delta {row['delta_top1']:+.2f} {row['delta_top1_ci']}", flush=True)
    return rows


def rows_to_refresh(data: dict, section: str, option: str, words_arg: str | None, recipes: dict[str, list[str]],
                    old: list[dict]) -> dict[str, list[str]]:
    """The recipes to measure: all of them, or (`option` given words) those whose label holds one of the
    comma-separated words, the stored rows `old` keeping the others; `data[section + "_refreshed"]` records
    which rows were measured again, on top of which commit's, for the report (`invocations`)."""
    words = [w for w in (words_arg or "").split(",") if w]
    if not words:
        data.pop(f"{section}_refreshed", None)
        return recipes
    chosen = {k: v for k, v in recipes.items() if any(w in k for w in words)}
    if not chosen or not old:
        raise SystemExit(f"{option} {words_arg}: no {section} row to refresh (rows: {', '.join(recipes)}; the store "
                         "must hold the others)")
    data[f"{section}_refreshed"] = {"rows": sorted(chosen),
                                    "others_at": data.get("measured", {}).get(section, "an earlier commit")}
    return chosen


def invocations(data: dict, section: str, option: str, command: str) -> str:
    """How a section's rows were measured: in one invocation of `command`, or some of them again later."""
    refreshed = data.get(f"{section}_refreshed")
    if not refreshed:
        return f"every row measured in one invocation (`python -m bench.run {command}`)"
    return (f"the rows {', '.join(refreshed['rows'])} measured again by `python -m bench.run {command} {option} ...` "
            f"at {data.get('measured', {}).get(section, '?')}, the others in one invocation at {refreshed['others_at']}")


def merge_rows(old: list[dict], fresh: list[dict]) -> list[dict]:
    """Rows of a section refreshed by label: the old ones not measured again, then the fresh ones."""
    labels = {r["label"] for r in fresh}
    return [r for r in old if r["label"] not in labels] + fresh


def cell(row: dict | None) -> str:
    """'top-1 (delta [low, high])' of one quantized run, '–' where it was not measured."""
    if row is None:
        return "–"
    low, high = row["delta_top1_ci"]
    return f"{row['quant_top1']:.2f} ({row['delta_top1']:+.2f} [{low:+.2f}, {high:+.2f}])"


def bits_header(bits: list[tuple[int, int]], first: str) -> list[str]:
    return [f"| {first} | " + " | ".join(f"W{w}A{a}" for w, a in bits) + " |", "|---|" + "---|" * len(bits)]
