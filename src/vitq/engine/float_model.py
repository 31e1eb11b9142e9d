"""The float stage: a task's model from pretrained weights, a local checkpoint, or trained here and cached."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from torch import nn

from ..files import written_atomically
from .tasks import Task

log = logging.getLogger(__name__)


def cache_dir(configured: str | None) -> Path:
    path = Path(configured or os.environ.get("VITQ_CACHE_DIR") or Path.home() / ".cache" / "vitq")
    path.mkdir(parents=True, exist_ok=True)
    return path


_DEPTH = re.compile(r"^(blocks|layers|stages)\.\d+")
_CLASSES = "the number of classes (the task's classes, or model.kwargs.num_classes)"
_PATCH = "the patch or image size (model.kwargs.patch_size / img_size, task.img_size)"
_WIDTH = "the width (model.kwargs.embed_dim / num_heads / mlp_ratio)"


def _mismatch_hints(keys: list[str], shapes: list[tuple[str, tuple, tuple]]) -> list[str]:
    """Which setting decides the mismatched keys (timm's layer names): the depth adds or drops blocks; for a
    shape, the dimension that differs tells the classes (the head's rows), the patch size (the patch
    convolution's kernel, the position table's length) or the width (anything else)."""
    hints = []
    if any(_DEPTH.match(k) for k in keys):
        hints.append("the depth (model.kwargs.depth)")
    for key, file, here in shapes:
        differ = [i for i, (a, b) in enumerate(zip(file, here)) if a != b] if len(file) == len(here) else [-1]
        if re.search(r"(^|\.)(head|fc|classifier)(\.|$)", key) and differ == [0]:
            hint = _CLASSES
        elif ("patch_embed" in key and differ and min(differ) >= 2) or ("pos_embed" in key and differ == [1]):
            hint = _PATCH
        else:
            hint = _WIDTH
        if hint not in hints:
            hints.append(hint)
    return hints or ["model.arch and model.kwargs"]


def load_checkpoint(model: nn.Module, path: str | os.PathLike, what: str = "model.checkpoint") -> nn.Module:
    """Load a float checkpoint (plain state dict, or under 'state_dict' / 'model'), strictly; anything
    else fails naming the file, the mismatched keys in short, and the setting that decides them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={path} does not exist; pass the path of a float checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (text files, truncated downloads, other formats)
        raise ValueError(f"{what}={path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass a file written by torch.save holding a "
                         "state dict (or a dict with one under 'state_dict' or 'model')") from None
    state = obj
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}={path} holds {type(obj).__name__}, not a state dict (names -> tensors); pass a "
                         "file written by torch.save(model.state_dict(), ...)")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        def short(keys: list[str], show=lambda k: k) -> str:  # noqa: ANN001
            return ", ".join(show(k) for k in keys[:4]) + (f" ... ({len(keys)} in all)" if len(keys) > 4 else "")

        detail = "; ".join(
            f"{label}: {text}" for label, text in (
                ("missing", short(missing)), ("unexpected", short(unexpected)),
                ("shape mismatch", short(shapes, lambda k: f"{k} {list(state[k].shape)} in the file vs {list(own[k].shape)}")))
            if text)
        raise ValueError(
            f"{what}={path} does not fit the architecture {type(model).__name__} ({detail}). Change "
            f"{' or '.join(_mismatch_hints(missing + unexpected, [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes]))}"
            " to match the checkpoint"
        )
    model.load_state_dict(state)
    return model


def float_key(model_cfg: Mapping, task_cfg: Mapping, task: Task, seed: int) -> str:
    """Identity of a model trained here: architecture, data and training recipe."""
    ident = {"model": {k: model_cfg[k] for k in ("arch", "kwargs")},
             "task": {**{k: task_cfg.get(k) for k in ("name", "img_size", "train_limit", "batch_size")},
                      "root": str(Path(task_cfg["root"]).resolve()) if task_cfg.get("root") else None},
             "fit": dict(task_cfg.get("fit") or {}), **task.identity(), "seed": seed}
    blob = json.dumps(ident, sort_keys=True, default=str)
    return f"{model_cfg['name']}-{task_cfg['name']}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


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
    if path.is_file():
        try:
            load_checkpoint(model, path, what="the float-model cache file")
            return model.eval(), f"cached {path}", key
        except ValueError as e:  # a damaged cache entry (a crash mid-copy, a full disk): rebuild it
            aside = path.with_name(path.name + ".unreadable")
            os.replace(path, aside)
            log.warning("%s\nmoved it to %s and training the float model again", e, aside)
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
    trainer.fit(module, train_dataloaders=task.train_loader())
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:  # under DDP every rank holds the same weights; one writes the cache
        return model.eval(), f"trained here in {seconds:.0f} s", key
    with written_atomically(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "model": dict(model_cfg), "fit": fit,
                    "train_seconds": seconds}, tmp)
    return model.eval(), f"trained here in {seconds:.0f} s, cached {path}", key
