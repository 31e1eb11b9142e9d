"""Structured schemas for every config group: a wrong key or value fails at start-up, naming the fix."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import secrets
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..methods import get_method
from ..quant.recipe import Recipe
from ..recipes import RUN_KEYS
from .context import STAGES

# logger configs read `offline: ${vitq.wandb_offline:}`: offline unless the user sets WANDB_MODE=online
OmegaConf.register_new_resolver("vitq.wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") != "online",
                                replace=True)


@functools.cache
def run_id() -> str:
    """A short random tag, one per process: two runs started in the same second get different directories
    (DDP workers receive the resolved directory from rank 0, so they never draw their own)."""
    return secrets.token_hex(3)


def recipe_name(cli_name: str, checkpoint: str | None) -> str:
    """The recipe a run evaluates: the checkpoint's own when one is given (stage=test), else the CLI's."""
    if checkpoint:
        try:
            import torch

            return str(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["recipe"]["name"])
        except Exception:  # noqa: BLE001  (an unreadable checkpoint is reported by the run with its path)
            return cli_name
    return cli_name


def devices_per_node(devices: Any) -> int:
    """`trainer.devices` as the cluster launcher's tasks per node: SLURM starts one task (one rank) per
    device, so it needs a count, not Lightning's -1 ("all visible")."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"hydra/launcher=slurm starts one task per device and needs trainer.devices=<devices per "
                         f"node> (a positive number), got trainer.devices={devices!r}")
    return devices


def gpus_per_node(accelerator: Any, devices: Any) -> int:
    """GPUs to request per node: none for a CPU trainer, else one per task."""
    return 0 if str(accelerator) == "cpu" else devices_per_node(devices)


# cached: a job the launcher starts in another process (submitit) copies the value of the launching process
# with the config's resolver cache, so its directory is the one the launcher announced
OmegaConf.register_new_resolver("vitq.run_id", run_id, replace=True, use_cache=True)
OmegaConf.register_new_resolver("vitq.devices_per_node", devices_per_node, replace=True)
OmegaConf.register_new_resolver("vitq.gpus_per_node", gpus_per_node, replace=True)
OmegaConf.register_new_resolver("vitq.recipe_name", recipe_name, replace=True)


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
    # train-time augmentation, built by tasks/classification.py (absent keys keep the task's default)
    augment: Optional[str] = None  # cifar10 / ImageFolder: null, "trivialaugment", "randaugment", "autoaugment"
    affine: Optional[dict] = None  # mnist: kwargs of torchvision's RandomAffine; null: translate 0.1
    random_erasing: float = 0.0  # probability of timm's RandomErasing (per image, after normalization)
    # batch mixing and threads, in tasks/classification.py (ClassificationModule)
    mixup: float = 0.0  # timm Mixup alpha (0: off)
    cutmix: float = 0.0  # timm CutMix alpha (0: off)
    num_threads: Optional[int] = None  # torch intra-op threads while training; null: leave as is


@dataclass
class TaskConf:
    name: str = "???"
    root: Optional[str] = None
    eval_root: Optional[str] = None  # ImageFolder root whose val/ is the evaluation split; null: root
    batch_size: int = 128
    num_workers: int = 0
    img_size: Optional[int] = None
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    skip_bad_images: bool = False  # leave unreadable image files out (with a warning naming them), not fail
    fit: FitConf = field(default_factory=FitConf)


@dataclass
class CalibConf:
    num_samples: int = 256
    batch_size: int = 32
    seed: int = 0


@dataclass
class FinetuneConf:
    """Quantization-aware finetuning after the recipe's stages (the `finetune` stage, docs/finetune.md)."""

    epochs: int = 0  # 0: no finetuning
    lr: float = 1.0e-4  # quantizer steps and zero points (LSQ / LSQ+)
    weights: bool = False  # also train the weights of the quantized layers
    weight_lr: Optional[float] = None  # null: lr
    weight_decay: float = 0.0  # on the weights only
    warmup_epochs: int = 0  # linear warm-up, then cosine decay to 0 (per step)
    batch_size: Optional[int] = None  # null: task.batch_size
    temperature: float = 2.0  # of the logit distillation (KL, scaled by T^2)
    task_weight: float = 1.0  # the task's own loss (cross-entropy; mmdet's detector losses)
    kd_weight: float = 1.0  # KL(teacher || student) on logits (classification)
    feature_weight: float = 1.0  # MSE between quantized and float backbone outputs (detection)
    zero_points: bool = True  # learn asymmetric grids' zero points too
    train_mode: bool = False  # false: dropout and normalization statistics as in evaluation
    val_samples: int = 500  # training images held out for the validation loop (never evaluation images)
    grad_clip: Optional[float] = None  # clip the gradient norm
    seed: int = 0  # shuffling, augmentation and the held-out split
    ckpt_path: Optional[str] = None  # resume: "last" (this run directory's last epoch) or a finetune .ckpt


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
    finetune: FinetuneConf = field(default_factory=FinetuneConf)
    method: str = "ptq"  # hooks around calibration (vitq/methods/); its switches are further keys


def quant_schema(method: str) -> type:
    """QuantConf plus the named method's switches (each a `quant.<name>` key)."""
    impl = get_method(method)
    hints = typing.get_type_hints(impl.Options)
    extra = [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(impl.Options)]
    from ..models import ADAPTERS  # the model adapters' switches are quant keys too (e.g. detector_scope)

    extra += [(f.name, typing.get_type_hints(a.Options)[f.name], field(default=f.default))
              for a in ADAPTERS.values() if a.Options is not None for f in dataclasses.fields(a.Options)]
    return dataclasses.make_dataclass(f"QuantConf_{impl.name}", extra, bases=(QuantConf,)) if extra else QuantConf


GROUPS = {"model": ModelConf, "task": TaskConf}


def _check_targets(cfg: DictConfig, group: str, hint: str) -> None:
    """Logger and callback groups: a mapping of names to `_target_` configs (instantiated by Hydra)."""
    node = cfg.get(group)
    if node is None:
        return
    if not isinstance(node, DictConfig):
        raise ValueError(f"{group} must be a mapping of name -> {{_target_: ...}} ({hint})")
    for name, entry in node.items():
        if entry is not None and (not isinstance(entry, DictConfig) or "_target_" not in entry):
            raise ValueError(f"{group}.{name} needs a _target_ (a class path), e.g. {hint}")


def _check_trainer(cfg: DictConfig) -> None:
    """Every trainer key must be an argument of lightning.Trainer (the config is passed to it as is)."""
    import lightning as L

    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    managed = {"logger", "callbacks"}  # built from the logger and callbacks groups
    for key in cfg.trainer:
        if key == "_target_":
            continue
        if key in managed or key not in valid:
            why = "set by the logger/callbacks groups" if key in managed else "not a lightning.Trainer argument"
            raise ValueError(f"invalid config trainer.{key}: {why}. Valid keys: {', '.join(sorted(valid - managed))}")


def _check_group(cfg: DictConfig, group: str, schema: type) -> None:
    try:
        OmegaConf.merge(OmegaConf.structured(schema), cfg[group])
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        valid = ", ".join(f.name for f in fields(schema))
        raise ValueError(
            f"invalid config {group}.{key}: {e.msg if hasattr(e, 'msg') else e}. Valid keys of '{group}': {valid}"
        ) from None


def finetune_options(cfg: Any) -> FinetuneConf:
    """`quant.finetune` as its dataclass (defaults for a recipe file without the section)."""
    node = cfg.quant.get("finetune") if hasattr(cfg, "quant") else None
    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    options = FinetuneConf(**{k: v for k, v in (values or {}).items() if k in {f.name for f in fields(FinetuneConf)}})
    for name in ("epochs", "val_samples"):
        if getattr(options, name) < 0:
            raise ValueError(f"quant.finetune.{name} must be >= 0, got {getattr(options, name)}")
    for name in ("lr", "temperature"):
        if not getattr(options, name) > 0:
            raise ValueError(f"quant.finetune.{name} must be > 0, got {getattr(options, name)}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ValueError(f"quant.finetune.batch_size must be >= 1 or null, got {options.batch_size}")
    return options


def finetune_epochs(cfg: Mapping[str, Any] | Any) -> int:
    return finetune_options(cfg).epochs


def validate(cfg: DictConfig) -> Recipe:
    """Check every group against its schema and the recipe against the quantizer; return the recipe."""
    for group in ("model", "task", "quant", "trainer", "logger"):
        if group not in cfg:
            raise ValueError(f"config group '{group}' is missing; pick one, e.g. {group}=<option>")
    for group, schema in GROUPS.items():
        _check_group(cfg, group, schema)
    _check_group(cfg, "quant", quant_schema(str(cfg.quant.get("method") or "ptq")))
    _check_trainer(cfg)
    _check_targets(cfg, "logger", "{_target_: lightning.pytorch.loggers.CSVLogger}")
    _check_targets(cfg, "callbacks", "{_target_: lightning.pytorch.callbacks.LearningRateMonitor}")
    stages = ("all", "summary", *STAGES)
    if cfg.stage not in stages:
        raise ValueError(f"stage={cfg.stage!r} is unknown: choose one of {', '.join(stages)}")
    if cfg.stage == "test" and not cfg.quant.from_checkpoint:
        raise ValueError("stage=test evaluates a saved model: pass quant.from_checkpoint=<run>/quantized.ckpt")
    if finetune_options(cfg).epochs > 0 and cfg.stage == "test":  # (finetune_options checks the values)
        raise ValueError("stage=test only evaluates a saved model: drop quant.finetune.epochs, or pass stage=all to "
                         "finetune the checkpoint and evaluate the result")
    calib = cfg.quant.calib
    if calib.num_samples < 1 or calib.batch_size < 1:
        raise ValueError("quant.calib.num_samples and quant.calib.batch_size must be at least 1")
    run_keys = RUN_KEYS | {f.name for f in fields(QuantConf)}  # every run-level key of the quant group
    return Recipe.from_config(OmegaConf.to_container(cfg.quant, resolve=True), run_keys=run_keys)
