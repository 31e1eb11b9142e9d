"""Every W&B sweep file parses and each of its runs can start: the fixed overrides of `command` plus the
first value of every parameter compose as Hydra overrides and pass the run's config check."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vitq.engine.config import validate
from vitq.engine.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
MACROS = {"${env}", "${interpreter}", "${program}", "${args_no_hyphens}"}


def test_every_sweep_is_tested():
    assert {p.name for p in SWEEPS} >= {"bits.yaml", "calibration.yaml", "finetune.yaml"}


def _first(spec: dict):
    for key in ("values", "value", "min"):
        if key in spec:
            return spec[key][0] if key == "values" else spec[key]
    raise AssertionError(f"parameter spec {spec} has no values, value or min")


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_composes_with_first_values(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and (ROOT / sweep["program"]).is_file()
    command = sweep["command"]
    assert "${args_no_hyphens}" in command and "${args}" not in command  # Hydra cannot parse --key=value
    assert command[:3] == ["${env}", "${interpreter}", "${program}"]
    fixed = [c for c in command if c not in MACROS]
    swept = [f"{k}={_first(v)}" for k, v in sweep["parameters"].items()]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*fixed, *swept])
    validate(cfg)  # a key or value train.py would refuse fails here
    for override in swept:  # each value reached its key
        key, value = override.split("=", 1)
        got = cfg[key].name if "." not in key else OmegaConf.select(cfg, key)  # a group choice names its file
        assert str(got) == value, (key, got, value)
    task = get_task(str(cfg.task.name))
    logged = {f"{p}/{m}" for m in task.metrics for p in ("fp", "quant", "quant/delta")} | {"calib/seconds"}
    logged |= {f"quant/delta_{m}" for m in task.metrics}
    if cfg.quant.finetune.epochs > 0:
        logged |= {"val/loss"}  # the finetune validation loop's
        assert sweep["metric"]["name"].startswith("val/"), f"{path.name}: select finetuning on held-out images"
    assert sweep["metric"]["name"] in logged, f"{path.name}: metric {sweep['metric']['name']} is never logged"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_no_sweep_sweeps_a_config_group(path):
    """W&B locks a swept key in the run's config: sweeping `quant` would replace the nested settings vitq
    logs under `quant` with the recipe's name."""
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()} | {"quant"}
    swept = set(yaml.safe_load(path.read_text())["parameters"])
    assert not swept & groups, f"{path.name} sweeps {sorted(swept & groups)}"


def test_finetune_sweep_reaches_the_finetune_stage():
    """The finetune sweep's runs have the finetune stage in their pipeline (epochs > 0 for every value)."""
    sweep = yaml.safe_load((ROOT / "sweeps" / "finetune.yaml").read_text())
    assert min(sweep["parameters"]["quant.finetune.epochs"]["values"]) > 0
