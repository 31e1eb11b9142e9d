"""Structured schemas for every config group: a wrong key or value fails at start-up, naming the fix."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import secrets
import typing
from dataclasses import field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..export import check_opset
from ..methods import get_method
from ..quant.quantizers import check_bits
from ..quant.recipe import Recipe
from ..recipes import RUN_KEYS
from .context import STAGES
from .schema import (AnalyzeConf, CalibConf, ExportConf, FinetuneConf, FitConf, ModelConf, QuantConf, RunConfig,
                     TaskConf)

__all__ = ["CalibConf", "FinetuneConf", "FitConf", "ModelConf", "QuantConf", "RunConfig", "TaskConf", "finetune_options",
           "quant_schema", "validate"]

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


def rank_tag() -> str:
    """'' on rank 0, '.rank<k>' on rank k of an externally launched job (srun's SLURM_PROCID, torchrun's
    RANK): every rank runs Hydra's job set-up in the same directory, so each writes its own `.hydra` and
    log. (Ranks Lightning starts itself get `hydra.output_subdir=null` and their own job name from it.)"""
    ntasks = os.environ.get("SLURM_NTASKS", "1")
    rank = os.environ.get("SLURM_PROCID") if ntasks.isdigit() and int(ntasks) > 1 else os.environ.get("RANK")
    return f".rank{rank}" if rank and rank.isdigit() and int(rank) > 0 else ""


# cached: a job the launcher starts in another process (submitit) copies the value of the launching process
# with the config's resolver cache, so its directory is the one the launcher announced
OmegaConf.register_new_resolver("vitq.run_id", run_id, replace=True, use_cache=True)
OmegaConf.register_new_resolver("vitq.devices_per_node", devices_per_node, replace=True)
OmegaConf.register_new_resolver("vitq.gpus_per_node", gpus_per_node, replace=True)
OmegaConf.register_new_resolver("vitq.recipe_name", recipe_name, replace=True)
OmegaConf.register_new_resolver("vitq.rank_tag", rank_tag, replace=True)


def quant_schema(method: str) -> type:
    """QuantConf plus the named method's switches (each a `quant.<name>` key)."""
    impl = get_method(method)
    hints = typing.get_type_hints(impl.Options)
    extra = [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(impl.Options)]
    from ..models import ADAPTERS  # the model adapters' switches are quant keys too (e.g. detector_scope)

    adapter_fields = {f.name: (f.name, typing.get_type_hints(a.Options)[f.name], field(default=f.default))
                      for a in ADAPTERS.values() if a.Options is not None for f in dataclasses.fields(a.Options)}
    extra += list(adapter_fields.values())  # adapters may share a switch (the attention layout)
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
    for name in ("epochs", "val_samples", "every_n_train_steps"):
        if getattr(options, name) < 0:
            raise ValueError(f"quant.finetune.{name} must be >= 0, got {getattr(options, name)}")
    for name in ("lr", "temperature"):
        if not getattr(options, name) > 0:
            raise ValueError(f"quant.finetune.{name} must be > 0, got {getattr(options, name)}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ValueError(f"quant.finetune.batch_size must be >= 1 or null, got {options.batch_size}")
    return options


def _section(cfg: DictConfig, group: str, schema: type) -> Any:
    """An optional top-level section (`analyze`, `export`) as its dataclass; defaults when absent."""
    if cfg.get(group) is None:
        return schema()
    _check_group(cfg, group, schema)
    return schema(**OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), cfg[group]), resolve=True))


def analyze_options(cfg: DictConfig) -> AnalyzeConf:
    options = _section(cfg, "analyze", AnalyzeConf)
    if options.split not in ("train", "eval"):
        raise ValueError(f"analyze.split must be train or eval, got {options.split!r}")
    for name in ("samples", "batch_size"):
        if getattr(options, name) < 1:
            raise ValueError(f"analyze.{name} must be at least 1, got {getattr(options, name)}")
    if options.keep < 0 or options.top < 0:
        raise ValueError("analyze.keep and analyze.top must be >= 0")
    if options.keep_bits is not None:
        check_bits(options.keep_bits, "analyze.keep_bits")
    return options


def kept_wider(options: AnalyzeConf, cfg_checkpoint: str | None = None) -> list[dict[str, Any]]:
    """`analyze.apply`: recipe overrides keeping the CSV's `keep` top-ranked points at `keep_bits` (or float)."""
    from ..report.sensitivity import keep_overrides, read_top

    if not options.apply:
        return []
    if cfg_checkpoint:
        raise ValueError("analyze.apply changes the recipe, and quant.from_checkpoint evaluates a saved model with "
                         "its own: calibrate again with analyze.apply (drop quant.from_checkpoint)")
    if options.keep < 1:
        raise ValueError("analyze.apply keeps the top analyze.keep points wider: set analyze.keep to 1 or more")
    return keep_overrides(read_top(options.apply, options.keep, narrower_than=options.keep_bits), options.keep_bits)


def validate(cfg: DictConfig) -> RunConfig:
    """Check every group against its schema and the recipe against the quantizer; the run's settings."""
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
    finetune = finetune_options(cfg)  # (checks the values)
    if finetune.epochs > 0 and cfg.stage == "test":
        raise ValueError("stage=test only evaluates a saved model: drop quant.finetune.epochs, or pass stage=all to "
                         "finetune the checkpoint and evaluate the result")
    calib = CalibConf(**OmegaConf.to_container(cfg.quant.calib, resolve=True))
    if calib.num_samples < 1 or calib.batch_size < 1:
        raise ValueError("quant.calib.num_samples and quant.calib.batch_size must be at least 1")
    run_keys = RUN_KEYS | {f.name for f in fields(QuantConf)}  # every run-level key of the quant group
    quant = OmegaConf.to_container(cfg.quant, resolve=True)
    analyze = analyze_options(cfg)
    quant["overrides"] = [*(quant.get("overrides") or []), *kept_wider(analyze, quant.get("from_checkpoint"))]
    export = _section(cfg, "export", ExportConf)
    check_opset(export.opset)
    if export.check_samples is not None and export.check_samples < 1:
        raise ValueError("export.check_samples must be positive (null: all evaluation images)")
    paths = cfg.get("paths") or {}
    return RunConfig(model=OmegaConf.to_container(cfg.model, resolve=True),
                     task=OmegaConf.to_container(cfg.task, resolve=True), quant=quant,
                     recipe=Recipe.from_config(quant, run_keys=run_keys), calib=calib, finetune=finetune,
                     seed=int(cfg.seed), stage=str(cfg.stage), cache_dir=paths.get("cache_dir"),
                     from_checkpoint=quant.get("from_checkpoint") or None, analyze=analyze, export=export)
