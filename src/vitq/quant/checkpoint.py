"""The quantized-model checkpoint: float weights, every quantizer's parameters and the recipe, in one file.

Writing and reading the file is plain data; rebuilding a model from it (`vitq.load_quantized`) needs the
model's adapters and the recipe's method, and lives in `vitq.pipeline`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..files import written_atomically
from .modules import integer_arithmetic
from .state import quant_state

CHECKPOINT_FORMAT = "vitq-quantized/1"


def save_quantized(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write float weights, every quantizer's parameters and the recipe to one file, atomically.

    `meta` (e.g. the model, task and quant configs of the run) is stored alongside, untouched.
    """
    state = quant_state(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    integer = {n: a for n, m in model.named_modules() if (a := integer_arithmetic(m)) is not None}
    with written_atomically(path) as tmp:
        ckpt = {"format": CHECKPOINT_FORMAT, "recipe": state.recipe.to_config(), "integer": integer,
                "state_dict": model.state_dict(), "meta": dict(meta or {})}
        if state.float_state is not None:  # weights changed non-equivalently (reconstruction): keep the float ones
            ckpt["float_state_dict"] = state.float_state
        torch.save(ckpt, tmp)
    return path


def read_quantized(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint {path} does not exist; pass the quantized.ckpt of a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # not a torch file at all
        raise ValueError(f"{path} is not a vitq quantized checkpoint (cannot be read: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vitq quantized checkpoint (expected format {CHECKPOINT_FORMAT})")
    check_finite(ckpt, str(path))
    return ckpt


def check_finite(ckpt: Mapping[str, Any], where: str) -> None:
    """A NaN scale makes a model whose every output is NaN, and its evaluation would still 'succeed'."""
    broken = [k for k, t in ckpt["state_dict"].items()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        raise ValueError(f"{where} holds non-finite values (NaN or Inf) in {len(broken)} tensor(s): "
                         f"{', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}; it cannot give a working "
                         "model: calibrate again")


def float_state_dict(ckpt: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights inside a quantized checkpoint, keyed for the float architecture `model`: the
    weights from before reconstruction where a stage changed them (`float_state_dict`), else the stored
    weights (a float-equivalent fold, such as a LayerNorm reparameterization, keeps the float model's function)."""
    own = model.state_dict()
    source = ckpt.get("float_state_dict") or ckpt["state_dict"]
    state = {k: v for k, v in source.items() if k in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"the quantized checkpoint does not fit {type(model).__name__}: missing "
                         f"{', '.join(missing[:5])}; pass the model= the checkpoint was made with")
    return state
