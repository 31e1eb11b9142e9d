"""Structured schemas for every config group: a wrong key or value fails at start-up, naming the fix."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..quant.recipe import Recipe

STAGES = ("all", "float", "test", "summary")


@dataclass
class ModelConf:
    name: str = "???"
    arch: str = "???"
    pretrained: bool = False
    checkpoint: Optional[str] = None
    kwargs: dict = field(default_factory=dict)


@dataclass
class FitConf:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.0


@dataclass
class TaskConf:
    name: str = "???"
    root: Optional[str] = None
    batch_size: int = 128
    num_workers: int = 0
    img_size: Optional[int] = None
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    fit: FitConf = field(default_factory=FitConf)


@dataclass
class CalibConf:
    num_samples: int = 256
    batch_size: int = 32
    seed: int = 0


@dataclass
class QuantConf:
    name: str = "???"
    scope: str = "matmul"
    w_bits: int = 8
    a_bits: int = 8
    attn_bits: int = 8
    observer: str = "minmax"
    calib: CalibConf = field(default_factory=CalibConf)
    weight: Optional[dict] = None
    activation: Optional[dict] = None
    linear_input: Optional[dict] = None
    matmul_input: Optional[dict] = None
    softmax_output: Optional[dict] = None
    norm_input: Optional[dict] = None
    linear_output: Optional[dict] = None
    softmax_input: Optional[dict] = None
    overrides: list = field(default_factory=list)
    from_checkpoint: Optional[str] = None
    ptf: bool = False  # Power-of-Two Factor quantizer at LayerNorm inputs (FQ-ViT)
    lis: bool = False  # log2 attention probabilities (FQ-ViT's Log-Int-Softmax)
    integer: bool = False  # evaluate LayerNorm and softmax with the integer kernels (needs ptf and lis)


@dataclass
class TrainerConf:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"


@dataclass
class LoggerConf:
    wandb: Optional[dict] = None
    csv: bool = True


GROUPS = {"model": ModelConf, "task": TaskConf, "quant": QuantConf, "trainer": TrainerConf, "logger": LoggerConf}


def _check_group(cfg: DictConfig, group: str, schema: type) -> None:
    try:
        OmegaConf.merge(OmegaConf.structured(schema), cfg[group])
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        valid = ", ".join(f.name for f in fields(schema))
        raise ValueError(
            f"invalid config {group}.{key}: {e.msg if hasattr(e, 'msg') else e}. Valid keys of '{group}': {valid}"
        ) from None


def validate(cfg: DictConfig) -> Recipe:
    """Check every group against its schema and the recipe against the quantizer; return the recipe."""
    for group, schema in GROUPS.items():
        if group not in cfg:
            raise ValueError(f"config group '{group}' is missing; pick one, e.g. {group}=<option>")
        _check_group(cfg, group, schema)
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is unknown: choose one of {', '.join(STAGES)}")
    if cfg.stage == "test" and not cfg.quant.from_checkpoint:
        raise ValueError("stage=test evaluates a saved model: pass quant.from_checkpoint=<run>/quantized.ckpt")
    calib = cfg.quant.calib
    if calib.num_samples < 1 or calib.batch_size < 1:
        raise ValueError("quant.calib.num_samples and quant.calib.batch_size must be at least 1")
    if cfg.quant.integer and not (cfg.quant.scope == "full" and cfg.quant.ptf and cfg.quant.lis):
        raise ValueError("quant.integer=true needs the integer-ready FQ-ViT setting: quant.scope=full, "
                         "quant.ptf=true and quant.lis=true (e.g. quant=fqvit quant.integer=true)")
    return Recipe.from_config(OmegaConf.to_container(cfg.quant, resolve=True))
