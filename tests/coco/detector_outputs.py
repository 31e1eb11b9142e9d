"""Run the random Cascade Mask R-CNN Swin-T once (predict, then loss and backward) on two coco-mini images and
save every output: `python -m tests.coco.detector_outputs COCO_ROOT OUT.pt`, in a process of its own so
that `VITQ_MMCV_KERNELS` decides which kernels mmcv.ops loads (compiled mmcv, or vitq's torchvision ones)."""
from __future__ import annotations

import sys

import torch


def detector_outputs(root: str) -> dict[str, torch.Tensor]:
    import vitq.mmcv_kernels
    from mmengine.dataset import pseudo_collate

    from vitq.tasks.coco import CocoTask, build_detector

    model_cfg = {"name": "cascade_mask_rcnn_swin_t", "arch": "cascade_mask_rcnn_swin_t",
                 "kwargs": {"test_cfg": {"rcnn": {"score_thr": 0.0}}}}  # random weights: keep every box
    torch.manual_seed(0)
    model = build_detector(model_cfg)
    task = CocoTask({"name": "coco", "root": root, "img_size": 320, "batch_size": 2}, model_cfg)
    ds = task.dataset("val", with_annotations=True)
    batch = pseudo_collate([ds[0], ds[1]])
    out = {"provider": torch.tensor([vitq.mmcv_kernels.provider() == "mmcv"])}
    with torch.no_grad():
        for i, sample in enumerate(model.test_step(batch)):
            pred = sample.pred_instances
            out.update({f"{i}.bboxes": pred.bboxes, f"{i}.scores": pred.scores, f"{i}.labels": pred.labels,
                        f"{i}.masks": pred.masks})
    model.train()
    data = model.data_preprocessor(batch, True)
    torch.manual_seed(1)  # the samplers draw proposals at random
    losses = model.loss(data["inputs"], data["data_samples"])
    total = sum(sum(v) if isinstance(v, (list, tuple)) else v for k, v in losses.items() if "loss" in k)
    total.backward()
    out.update({f"loss.{k}": (torch.stack(list(v)) if isinstance(v, (list, tuple)) else v).detach()
                for k, v in losses.items()})
    out.update({f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    return out


if __name__ == "__main__":
    torch.save(detector_outputs(sys.argv[1]), sys.argv[2])
