"""The classification DataModule: the train and test datasets with their transforms, and their loaders."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitq.engine.tasks import hold_out
from .data import TransformedSubset


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

    # no val_dataloader: Lightning, given this module to train the float model, must not validate on the
    # evaluation split (the finetune stage validates on training images it holds out)

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
