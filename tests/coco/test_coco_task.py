"""The COCO task: coco-mini loads in full through mmdet's pipeline; calibration and test loaders;
checkpoints in mmdet 3 and mmdet 2 (Swin repository) key layouts; a misfit lists its keys."""
from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch

from .conftest import needs_mmdet

pytestmark = needs_mmdet
MODEL = {"name": "cascade_mask_rcnn_swin_t", "arch": "cascade_mask_rcnn_swin_t"}


def make_task(root, **cfg):
    from vitq.tasks.coco import CocoTask

    return CocoTask({"name": "coco", "root": str(root), "img_size": 96, "batch_size": 2, **cfg}, MODEL)


def test_coco_mini_loads_in_full(coco_mini_root):
    task = make_task(coco_mini_root)
    ds = task.dataset("val", with_annotations=True)
    assert len(ds) == 15
    objects = crowd = 0
    for i in range(len(ds)):
        item = ds[i]
        sample = item["data_samples"]
        h, w = item["inputs"].shape[1:]
        assert item["inputs"].shape[0] == 3 and min(h, w) <= 96 and max(h, w) <= 160  # scale (160, 96)
        assert min(h, w) == 96 or max(h, w) == 160
        assert len(sample.gt_instances.masks) == len(sample.gt_instances.bboxes)
        objects += len(sample.gt_instances) + len(sample.ignored_instances)
        crowd += len(sample.ignored_instances)
    assert (objects, crowd) == (105, 1)  # every official annotation, the crowd RLE among the ignored
    assert task.describe()["test_size"] == 15
    batches = list(task.test_loader())
    assert [len(b["inputs"]) for b in batches] == [2] * 7 + [1]
    calib = list(task.calib_loader(5, 32, seed=0))
    assert sum(len(b["inputs"]) for b in calib) == 5 and max(len(b["inputs"]) for b in calib) == 2
    with pytest.raises(ValueError, match="num_samples=16 but train2017 .* has 15 images"):
        task.calib_loader(16, 2, seed=0)


def to_mmdet2_swin(state: dict) -> OrderedDict:
    """Inverse of mmdet's swin_converter: the original Swin detection repository's key layout."""
    out = OrderedDict()
    for k, v in state.items():
        if k.startswith("backbone.") and not re.match(r"backbone\.norm\d", k):
            k = (k.replace("backbone.stages.", "backbone.layers.").replace("attn.w_msa.", "attn.")
                 .replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
                 .replace("patch_embed.projection", "patch_embed.proj"))
            if "downsample.reduction" in k:
                o, i = v.shape
                v = v.reshape(o, i // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(o, i)
            elif "downsample.norm" in k:
                c = v.shape[0]
                v = v.reshape(c // 4, 4).transpose(0, 1)[[0, 2, 1, 3]].reshape(c)
        out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def detector():
    from vitq.tasks.coco import build_detector

    torch.manual_seed(1)
    return build_detector(MODEL)


def test_mmdet3_and_mmdet2_checkpoints_load(detector, tmp_path):
    from vitq.tasks.coco import build_detector, load_detector_checkpoint

    state = detector.state_dict()
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "mmdet3.pth")
    old = to_mmdet2_swin(state)
    assert any(k.startswith("backbone.layers.0.blocks.0.attn.qkv") for k in old)
    torch.save({"state_dict": old, "meta": {}}, tmp_path / "mmdet2.pth")
    for name in ("mmdet3.pth", "mmdet2.pth"):
        torch.manual_seed(2)
        fresh = build_detector(MODEL)
        load_detector_checkpoint(fresh, tmp_path / name)
        loaded = fresh.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name


def test_checkpoint_that_does_not_fit_lists_keys(detector, tmp_path):  # noqa: D103
    from vitq.tasks.coco import build_detector, load_detector_checkpoint

    state = dict(detector.state_dict())
    dropped = next(k for k in state if k.endswith("conv_logits.weight"))
    state.pop(dropped)
    state["roi_head.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        load_detector_checkpoint(build_detector(MODEL), tmp_path / "bad.pth")
    msg = str(e.value)
    assert f"missing (1): {dropped}" in msg
    assert "unexpected (1): roi_head.extra.weight" in msg and "mmdet 3 key layout" in msg
    with pytest.raises(FileNotFoundError, match="model.checkpoint=.*does not exist"):
        load_detector_checkpoint(detector, tmp_path / "absent.pth")


def test_detector_configs_share_one_swin_t_backbone_and_unknown_arch_lists_detectors_only():
    """Both Swin-T detectors take the backbone from `_swin_t_backbone.py` (replacing mmdet's ResNet-50);
    the Swin-S ones change only depth and drop path; the shared part is not offered as a model.arch."""
    from vitq.tasks.coco import detector_config

    models = {arch: detector_config({"arch": arch}).model for arch in
              ("mask_rcnn_swin_t", "cascade_mask_rcnn_swin_t", "mask_rcnn_swin_s", "cascade_mask_rcnn_swin_s")}
    assert models["mask_rcnn_swin_t"].backbone == models["cascade_mask_rcnn_swin_t"].backbone
    t = models["mask_rcnn_swin_t"].backbone
    assert t.type == "SwinTransformer" and t.depths == [2, 2, 6, 2] and "depth" not in t  # no ResNet key left
    assert models["cascade_mask_rcnn_swin_t"].neck.in_channels == [96, 192, 384, 768]
    s = models["cascade_mask_rcnn_swin_s"].backbone
    assert s.depths == [2, 2, 18, 2] and s.drop_path_rate == 0.3 and s.embed_dims == t.embed_dims
    with pytest.raises(FileNotFoundError, match="known: cascade_mask_rcnn_swin_s, cascade_mask_rcnn_swin_t, "
                                                "mask_rcnn_swin_s, mask_rcnn_swin_t, or a path"):
        detector_config({"arch": "nope"})


def test_a_spawned_loader_worker_gets_the_kernels_before_mmdet_imports_mmcv_ops(coco_mini_root):
    """The worker unpickles the task's Subset class first (importing vitq's mmcv._ext hook); an mmdet dataset
    unpickled first would import mmcv.ops without it and, under mmcv-lite, fail on mmcv._ext."""
    from torch.utils.data import DataLoader

    from vitq.tasks.coco import CocoSubset

    task = make_task(coco_mini_root)
    datasets = [task.calib_loader(2, 2, seed=0).dataset, task.test_loader().dataset, *task.finetune_split(2, 0)]
    assert all(type(ds) is CocoSubset for ds in datasets)
    loader = DataLoader(datasets[-1], batch_size=2, num_workers=1, multiprocessing_context="spawn",
                        collate_fn=task.collate_fn())
    (batch,) = list(loader)
    assert len(batch["inputs"]) == 2 and len(batch["data_samples"][0].gt_instances) > 0
