"""Classification datamodules: embedded MNIST, shared CIFAR-10 folder, a generated ImageFolder, bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler

from vitq.tasks.classification import (
    TASKS,
    ClassificationDataModule,
    mnist_arrays,
    build_datamodule,
    find_shared_data,
    mnist_split_indices,
)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FAKE_DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


def task(name: str, **kw) -> dict:
    cfg = {"name": name, "root": None, "batch_size": 16, "num_workers": 0, "img_size": None}
    cfg.update({"eval_limit": None, "train_limit": None})
    cfg.update(kw)
    return cfg


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def make_image_folder(root: Path, splits=("train", "val"), classes=("cats", "dogs"), per_class=3, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def mnist() -> ClassificationDataModule:
    return build_datamodule(task("mnist"))


# ---- MNIST ----------------------------------------------------------------------------------------
def test_mnist_split_sizes_and_every_class_in_both(mnist):
    assert isinstance(mnist, ClassificationDataModule)
    n_train, n_test = len(mnist.train_dataset), len(mnist.test_dataset)
    assert n_train + n_test == 5000
    assert (n_train, n_test) == (4000, 1000)
    train_counts = np.bincount(mnist.train_dataset.targets, minlength=10)
    test_counts = np.bincount(mnist.test_dataset.targets, minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all()
    assert train_counts.tolist() == [400] * 10 and test_counts.tolist() == [100] * 10
    assert (mnist.num_classes, mnist.in_chans, mnist.img_size) == (10, 1, 28)
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    d = mnist.describe()
    assert d["name"] == "mnist" and d["train_size"] == 4000 and d["test_size"] == 1000
    assert {"root", "img_size", "mean", "std"} <= d.keys()


def test_mnist_split_is_first_80_percent_of_each_class_in_file_order():
    X, y = mnist_arrays()
    assert X.shape == (5000, 784) and X.dtype == np.uint8 and X.max() == 255
    train_idx, test_idx = mnist_split_indices(y)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert len(train_idx) + len(test_idx) == 5000
    for c in range(10):
        idx = np.flatnonzero(y == c)
        assert np.array_equal(np.intersect1d(train_idx, idx), idx[:400])
        assert np.array_equal(np.intersect1d(test_idx, idx), idx[400:])


def test_mnist_batch_shape_range_and_labels(mnist):
    x, y = next(iter(mnist.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    xt, yt = next(iter(mnist.test_dataloader()))
    assert xt.shape == (16, 1, 28, 28)
    assert yt.tolist() == list(mnist.test_dataset.targets[:16])  # the test split in order
    # normalized with MNIST statistics: background (0) maps to -mean/std, ink (1) to (1-mean)/std
    assert xt.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert xt.max().item() <= (1 - 0.1307) / 0.3081 + 1e-5
    assert isinstance(mnist.train_dataloader().sampler, RandomSampler)
    assert isinstance(mnist.test_dataloader().sampler, SequentialSampler)
    # no validation loader: Lightning, given this DataModule to train the float model, never sees the
    # evaluation split as validation data
    assert not is_overridden("val_dataloader", mnist)


def test_mnist_split_deterministic_across_builds(mnist):
    other = build_datamodule(task("mnist", batch_size=8))
    for a, b in [(mnist.train_base, other.train_base), (mnist.test_base, other.test_base)]:
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    x1, y1 = next(iter(mnist.test_dataloader()))
    x2, y2 = next(iter(other.test_dataloader()))
    assert torch.equal(x1[:8], x2) and torch.equal(y1[:8], y2)


def test_mnist_limits_and_img_size_override():
    dm = build_datamodule(task("mnist", train_limit=100, eval_limit=50, img_size=32))
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (100, 50)
    # class-interleaved first N: every class represented, evenly
    assert np.bincount(dm.test_dataset.targets, minlength=10).tolist() == [5] * 10
    assert np.bincount(dm.train_dataset.targets, minlength=10).tolist() == [10] * 10
    again = build_datamodule(task("mnist", train_limit=100, eval_limit=50, img_size=32))
    assert again.test_dataset.targets == dm.test_dataset.targets
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and dm.img_size == 32


def test_mnist_calib_loader(mnist):
    loader = mnist.calib_dataloader(37, batch_size=8, seed=3)
    assert isinstance(loader.sampler, SequentialSampler)
    x, y = all_batches(loader)
    assert x.shape == (37, 1, 28, 28) and len(y) == 37
    assert [len(b[0]) for b in loader] == [8, 8, 8, 8, 5]
    picks = loader.dataset.indices
    assert len(set(picks)) == 37 and all(0 <= i < 5000 for i in picks)

    # drawn from the TRAINING split, with the EVAL transform (no augmentation)
    raw = torch.stack([mnist.train_base[i][0] for i in picks])
    labels = torch.tensor([mnist.train_base[i][1] for i in picks])
    expected = torch.stack([mnist.eval_transform(img) for img in raw])
    assert torch.equal(x, expected) and torch.equal(y, labels)

    # deterministic: same seed -> same images; another seed -> another draw
    x_again, y_again = all_batches(mnist.calib_dataloader(37, batch_size=16, seed=3))
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    other = mnist.calib_dataloader(37, batch_size=8, seed=4).dataset.indices
    assert other != picks

    # the training augmentation (random translation) would have changed some of them
    torch.manual_seed(0)
    augmented = torch.stack([mnist.train_transform(img) for img in raw])
    assert not torch.equal(augmented, x)


def test_mnist_calib_rejects_bad_sizes(mnist):
    with pytest.raises(ValueError, match="4000"):
        mnist.calib_dataloader(4001, batch_size=8)
    with pytest.raises(ValueError, match=r"num_samples=0 is out of range"):
        mnist.calib_dataloader(0, batch_size=8)
    x, _ = all_batches(mnist.calib_dataloader(4000, batch_size=1000))
    assert len(x) == 4000
    limited = build_datamodule(task("mnist", train_limit=20))
    with pytest.raises(ValueError, match="train_limit"):
        limited.calib_dataloader(21, batch_size=4)


# ---- CIFAR-10 (shared folder) ---------------------------------------------------------------------
def test_cifar10_shared_folder():
    root = find_shared_data("cifar10-small")
    if root is None:
        pytest.skip("../shared/data/cifar10-small is absent (see the shared data README)")
    dm = build_datamodule(task("cifar10", root=str(root), batch_size=8, train_limit=40, eval_limit=20))
    assert dm.num_classes == 10 and dm.in_chans == 3 and dm.img_size == 32
    assert dm.classes == CIFAR_CLASSES
    assert dm.train_base.base.classes == dm.test_base.base.classes == CIFAR_CLASSES
    assert dm.mean == (0.4914, 0.4822, 0.4465) and dm.std == (0.2470, 0.2435, 0.2616)
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (40, 20)
    assert sorted(set(dm.test_dataset.targets)) == list(range(10))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and ((y >= 0) & (y < 10)).all()
    xt, yt = all_batches(dm.test_dataloader())
    assert xt.shape == (20, 3, 32, 32) and yt.tolist() == dm.test_dataset.targets
    xc, _ = all_batches(dm.calib_dataloader(12, batch_size=5, seed=1))
    assert xc.shape == (12, 3, 32, 32)
    d = dm.describe()
    assert d["root"] == str(root.resolve()) and d["full_train_size"] == 10000 and d["full_test_size"] == 2000


# ---- generated ImageFolder ------------------------------------------------------------------------
def test_imagefolder_with_timm_data_config(tmp_path):
    root = make_image_folder(tmp_path / "data")
    dm = build_datamodule(task("imagefolder", root=str(root), batch_size=4, num_workers=1), FAKE_DATA_CONFIG)
    assert dm.num_classes == 2 and dm.classes == ["cats", "dogs"] and dm.img_size == 32 and dm.in_chans == 3
    assert dm.mean == FAKE_DATA_CONFIG["mean"] and dm.std == FAKE_DATA_CONFIG["std"]
    assert dm.describe()["resize"] == int(32 / 0.875)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and not loader.pin_memory
    x, y = next(iter(loader))  # one worker process: the datasets and transforms pickle
    assert x.shape == (4, 3, 32, 32)
    _, y_all = all_batches(loader)  # shuffled, but every training image once per epoch
    assert sorted(y_all.tolist()) == [0, 0, 0, 1, 1, 1]
    xt, yt = all_batches(dm.test_dataloader())
    assert xt.shape == (6, 3, 32, 32) and yt.tolist() == [0, 0, 0, 1, 1, 1]
    xt2, _ = all_batches(dm.test_dataloader())
    assert torch.equal(xt, xt2)  # eval transform is deterministic
    xc, _ = all_batches(dm.calib_dataloader(6, batch_size=4))
    assert xc.shape == (6, 3, 32, 32)

    sized = build_datamodule(task("imagenet", root=str(root), img_size=24), FAKE_DATA_CONFIG)
    assert next(iter(sized.test_dataloader()))[0].shape == (6, 3, 24, 24)
    assert not sized.test_dataloader().persistent_workers


def test_eval_root_takes_the_evaluation_split_from_its_val_folder(tmp_path):
    root = make_image_folder(tmp_path / "data", splits=("train",))  # no val/ under task.root is fine
    evals = make_image_folder(tmp_path / "eval", splits=("val",), per_class=4, seed=1)
    dm = build_datamodule(task("cifar10", root=str(root), eval_root=str(evals), batch_size=4))
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (6, 8)
    assert dm.test_base.root == str(evals / "val") and dm.train_base.root == str(root / "train")
    d = dm.describe()
    assert d["root"] == str(root.resolve()) and d["eval_root"] == str(evals.resolve())
    xt, yt = all_batches(dm.test_dataloader())
    assert len(xt) == 8 and yt.tolist() == [0] * 4 + [1] * 4
    plain = make_image_folder(tmp_path / "plain")
    assert "eval_root" not in build_datamodule(task("cifar10", root=str(plain), eval_root=None)).describe()


@pytest.mark.parametrize("make_val", [False, True])
def test_eval_root_missing_names_the_folder(tmp_path, make_val):
    root = make_image_folder(tmp_path / "data")
    missing = tmp_path / "eval"
    if make_val:
        missing.mkdir()  # exists, but without val/
    with pytest.raises(FileNotFoundError, match=r"task\.eval_root") as e:
        build_datamodule(task("cifar10", root=str(root), eval_root=str(missing)))
    assert str(missing) in str(e.value) and "val/" in str(e.value)


def test_eval_root_class_mismatch_and_mnist(tmp_path):
    root = make_image_folder(tmp_path / "data", splits=("train",))
    evals = make_image_folder(tmp_path / "eval", splits=("val",), classes=("cats", "birds"))
    with pytest.raises(ValueError, match="class folders differ") as e:
        build_datamodule(task("cifar10", root=str(root), eval_root=str(evals)))
    assert str(evals / "val") in str(e.value)
    with pytest.raises(ValueError, match="eval_root"):
        build_datamodule(task("mnist", eval_root=str(evals)))


def test_shared_cifar10_eval_set():
    root, evals = find_shared_data("cifar10-small"), find_shared_data("cifar10-eval")
    if root is None or evals is None:
        pytest.skip("../shared/data/cifar10-small or cifar10-eval is absent (see the shared data README)")
    dm = build_datamodule(task("cifar10", root=str(root), eval_root=str(evals), eval_limit=20))
    assert dm.classes == CIFAR_CLASSES and dm.describe()["full_test_size"] == 10000
    assert sorted(set(dm.test_dataset.targets)) == list(range(10))


def test_fit_augmentation_knobs(tmp_path):
    root = make_image_folder(tmp_path / "data")
    fit = {"augment": "trivialaugment", "random_erasing": 0.5}
    dm = build_datamodule(task("cifar10", root=str(root), batch_size=6, fit=fit))
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    for name in ("randaugment", "autoaugment"):
        build_datamodule(task("imagefolder", root=str(root), fit={"augment": name}), FAKE_DATA_CONFIG)
    with pytest.raises(ValueError, match="task.fit.augment"):
        build_datamodule(task("cifar10", root=str(root), fit={"augment": "bogus"}))
    with pytest.raises(ValueError, match="mnist only"):
        build_datamodule(task("cifar10", root=str(root), fit={"affine": {"degrees": 10}}))
    with pytest.raises(ValueError, match="random_erasing"):
        build_datamodule(task("cifar10", root=str(root), fit={"random_erasing": 2}))
    mnist = build_datamodule(task("mnist", fit={"affine": {"degrees": 15, "scale": [0.9, 1.1]},
                                                "augment": "randaugment", "random_erasing": 0.25}))
    x, y = next(iter(mnist.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="task.fit.affine"):
        build_datamodule(task("mnist", fit={"affine": {"rotate": 15}}))


# ---- bad inputs fail at build time, naming the path -----------------------------------------------
@pytest.mark.parametrize("name", ["imagenet", "imagefolder", "cifar10"])
def test_root_required(name):
    with pytest.raises(ValueError, match=rf"task\.root is required for task={name}"):
        build_datamodule(task(name, root=None), FAKE_DATA_CONFIG)


def test_missing_root_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        build_datamodule(task("imagenet", root=str(missing)), FAKE_DATA_CONFIG)
    assert str(missing) in str(e.value)


def test_missing_val_folder(tmp_path):
    root = make_image_folder(tmp_path / "data", splits=("train",))
    with pytest.raises(FileNotFoundError) as e:
        build_datamodule(task("imagefolder", root=str(root)), FAKE_DATA_CONFIG)
    assert str(root / "val") in str(e.value)


def test_missing_train_folder(tmp_path):
    root = make_image_folder(tmp_path / "data", splits=("val",))
    with pytest.raises(FileNotFoundError) as e:
        build_datamodule(task("cifar10", root=str(root)))
    assert str(root / "train") in str(e.value)


def test_empty_class_folders(tmp_path):
    root = make_image_folder(tmp_path / "data", splits=("val",))
    for cls in ("cats", "dogs"):
        (root / "train" / cls).mkdir(parents=True)
    (root / "train" / "dogs" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError) as e:
        build_datamodule(task("imagefolder", root=str(root)), FAKE_DATA_CONFIG)
    assert str(root / "train") in str(e.value) and str(root / "train" / "dogs") in str(e.value)


def test_split_without_class_folders(tmp_path):
    root = make_image_folder(tmp_path / "data", splits=("train",))
    (root / "val").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        build_datamodule(task("imagefolder", root=str(root)), FAKE_DATA_CONFIG)
    assert str(root / "val") in str(e.value)


def test_unknown_task_name():
    with pytest.raises(ValueError) as e:
        build_datamodule(task("svhn"))
    assert "svhn" in str(e.value) and all(name in str(e.value) for name in TASKS)


def test_find_shared_data():
    assert find_shared_data("no-such-dataset-xyz") is None
    found = find_shared_data("cifar10-small")
    if found is not None:
        assert found.is_dir() and found.parent.name == "data" and found.parent.parent.name == "shared"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_truncated_evaluation_image_fails_at_build_naming_the_file(tmp_path):
    root = make_image_folder(tmp_path / "data")
    _truncate(root / "val" / "dogs" / "1.png")
    with pytest.raises(OSError, match=r"unreadable image\(s\) in the evaluation split of task=imagefolder:\n  "
                                      r".*val/dogs/1\.png"):
        build_datamodule(task("imagefolder", root=str(root)), FAKE_DATA_CONFIG)
    dm = build_datamodule(task("imagefolder", root=str(root), skip_bad_images=True), FAKE_DATA_CONFIG)
    assert len(dm.test_dataset) == 5 and all(dm.test_dataset.path(i) != str(root / "val/dogs/1.png") for i in range(5))
    assert len(all_batches(dm.test_dataloader())[0]) == 5


def test_truncated_training_image_fails_when_its_loader_is_built(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4)
    _truncate(root / "train" / "cats" / "2.png")
    dm = build_datamodule(task("imagefolder", root=str(root)), FAKE_DATA_CONFIG)  # the training split is not read yet
    with pytest.raises(OSError, match=r"in the calibration images of task=imagefolder:\n  .*train/cats/2\.png"):
        dm.calib_dataloader(8, 4)
    with pytest.raises(OSError, match=r"in the training split of task=imagefolder:\n  .*train/cats/2\.png"):
        dm.train_dataloader()
    skip = build_datamodule(task("imagefolder", root=str(root), skip_bad_images=True), FAKE_DATA_CONFIG)
    assert len(skip.calib_dataloader(8, 4).dataset) == 7
    assert len(skip.train_dataloader().dataset) == 7
