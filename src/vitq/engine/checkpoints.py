"""Float checkpoints: a state dict loaded strictly, and what does not fit said in the user's terms."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn


def state_diff(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
               ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) keys of `state` against a model's own state dict, sorted."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    return missing, unexpected, shapes


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
    missing, unexpected, shapes = state_diff(own, state)
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
