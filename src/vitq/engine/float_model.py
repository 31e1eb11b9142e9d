"""The float stage: a task's model from pretrained weights, a local checkpoint, or trained here and cached."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from torch import nn

from ..files import written_atomically
from .agreement import decided_on_rank0
from .checkpoints import load_checkpoint
from .tasks import Task

log = logging.getLogger(__name__)


def cache_dir(configured: str | None) -> Path:
    path = Path(configured or os.environ.get("VITQ_CACHE_DIR") or Path.home() / ".cache" / "vitq")
    path.mkdir(parents=True, exist_ok=True)
    return path


def float_key(model_cfg: Mapping, task_cfg: Mapping, task: Task, seed: int) -> str:
    """Identity of a model trained here: architecture, data and training recipe."""
    ident = {"model": {k: model_cfg[k] for k in ("arch", "kwargs")},
             "task": {**{k: task_cfg.get(k) for k in ("name", "img_size", "train_limit", "batch_size")},
                      "root": str(Path(task_cfg["root"]).resolve()) if task_cfg.get("root") else None},
             "fit": dict(task_cfg.get("fit") or {}), **task.identity(), "seed": seed}
    blob = json.dumps(ident, sort_keys=True, default=str)
    return f"{model_cfg['name']}-{task_cfg['name']}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def _read_cache(model: nn.Module, path: Path) -> dict[str, torch.Tensor] | None:
    """The cached float weights, or None (absent, or damaged: moved aside so the model is trained again)."""
    if not path.is_file():
        return None
    try:
        load_checkpoint(model, path, what="the float-model cache file")
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    except ValueError as e:  # a damaged cache entry (a crash mid-copy, a full disk): rebuild it
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        log.warning("%s\nmoved it to %s and training the float model again", e, aside)
        return None


def obtain_float_model(task: Task, model_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], cache: Path,
                       seed: int, make_trainer: Callable[..., L.Trainer]) -> tuple[nn.Module, str, str]:
    """Returns (model, source description, cache key)."""
    checkpoint = model_cfg.get("checkpoint")
    pretrained = bool(model_cfg.get("pretrained")) and not checkpoint  # a local file replaces hub weights
    model = task.create_model(pretrained=pretrained)
    key = float_key(model_cfg, task_cfg, task, seed)
    if checkpoint:
        task.load_weights(model, checkpoint)
        return model.eval(), f"checkpoint {checkpoint}", key + "-ckpt"
    if pretrained:
        return model.eval(), "timm pretrained weights", key + "-pretrained"
    fit = dict(task_cfg.get("fit") or {})
    path = cache / f"{key}.pt"
    cached = decided_on_rank0(make_trainer, lambda: _read_cache(model, path))  # every rank follows rank 0
    if cached is not None:
        model.load_state_dict(cached)
        return model.eval(), f"cached {path}", key
    if int(fit.get("epochs", 0)) <= 0:
        raise ValueError(
            f"no float weights for {model_cfg['name']} on {task_cfg['name']}: {task.weights_hint}"
        )
    log.info("training the float model %s on %s for %s epochs (cached as %s)",
             model_cfg["name"], task_cfg["name"], fit["epochs"], path)
    L.seed_everything(seed, workers=True)
    module = task.fit_module(model, fit)
    start = time.perf_counter()
    trainer = make_trainer(max_epochs=int(fit["epochs"]))
    trainer.fit(module, datamodule=task.train_data())
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:  # under DDP every rank holds the same weights; one writes the cache
        return model.eval(), f"trained here in {seconds:.0f} s", key
    with written_atomically(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "model": dict(model_cfg), "fit": fit,
                    "train_seconds": seconds}, tmp)
    return model.eval(), f"trained here in {seconds:.0f} s, cached {path}", key
