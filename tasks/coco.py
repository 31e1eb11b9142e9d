"""COCO 2017 detection and instance segmentation with mmdet detectors (Cascade / Mask R-CNN, Swin).

The detector is an mmdet 3 model built from the project's config files (`tasks/mmdet_configs/`) with
`MODELS.build`, and runs inside Lightning modules: mmdet's data preprocessor (moved to the module's
device), its test pipeline and `pseudo_collate`. Evaluation is COCOeval on the gathered predictions
of all ranks (tasks/coco_eval.py), with paired bootstrap intervals over images.

`task.root` has the COCO 2017 layout (LAYOUT); a missing part stops the run at start-up, naming it.
Calibration images come from train2017 (the evaluation pipeline, no augmentation); evaluation is on
val2017. `task.img_size` is the short side of the test scale (800: 800x1333, the papers' setting).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vitq import mmcv_kernels
from vitq.engine.checkpoints import state_diff
from vitq.engine.tasks import EvalModule, Task, hold_out, register_task

from .coco_eval import METRICS, compare_ap, evaluate_records, prediction_record

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "mmdet_configs"
LAYOUT = {"train images": "train2017", "val images": "val2017",
          "train annotations": "annotations/instances_train2017.json",
          "val annotations": "annotations/instances_val2017.json"}
LAYOUT_TEXT = ("<root>/train2017/*.jpg, <root>/val2017/*.jpg, <root>/annotations/instances_train2017.json, "
               "<root>/annotations/instances_val2017.json")
INSTALL_HINT = "install the detection extra: `make setup` (or `pip install -e '.[det]'`; docs/coco.md)"


class CocoSubset(Subset):
    """A Subset of an mmdet dataset whose class lives here: a spawned loader worker unpickles this class
    first, importing this module and with it vitq's mmcv kernels, before the mmdet dataset inside it
    imports mmcv.ops (under mmcv-lite that import needs them)."""


def require_mmdet() -> None:
    """mmdet and mmcv's ops (compiled, or mmcv-lite with vitq's torchvision kernels), or how to install them."""
    try:
        import mmdet  # noqa: F401
        from mmcv.ops import RoIAlign  # noqa: F401
    except (ImportError, ModuleNotFoundError) as e:
        raise ImportError(f"task=coco needs mmdet 3 and mmcv (or mmcv-lite) ({e}); {INSTALL_HINT}") from e


def check_layout(root: str | None) -> Path:
    """The COCO root, or an error naming what is missing and the layout expected."""
    if not root:
        raise ValueError(f"task=coco needs task.root=/path/to/coco with the COCO 2017 layout: {LAYOUT_TEXT}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"task.root={root} is not a directory; expected the COCO 2017 layout: {LAYOUT_TEXT}")
    missing = [f"{rel} ({what})" for what, rel in LAYOUT.items() if not (path / rel).exists()]
    if missing:
        raise FileNotFoundError(f"task.root={root} is missing {', '.join(missing)}; expected the COCO 2017 "
                                f"layout: {LAYOUT_TEXT}")
    return path


def test_scale(img_size: int | None) -> tuple[int, int]:
    """mmdet's (long, short) resize scale for a short side (800 -> (1333, 800))."""
    short = int(img_size or 800)
    return (round(short * 1333 / 800), short)


def detector_config(model_cfg: Mapping[str, Any]):  # noqa: ANN201  (an mmengine Config)
    """The model group's mmdet config: `arch` names a file in tasks/mmdet_configs/ or is a path;
    `kwargs` is merged into the config's `model` (e.g. {test_cfg: {rcnn: {score_thr: 0.0}}})."""
    from mmengine.config import Config

    arch = str(model_cfg["arch"])
    path = Path(arch) if arch.endswith(".py") else CONFIG_DIR / f"{arch}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_")))  # _: parts
        raise FileNotFoundError(f"model.arch={arch}: no mmdet config {path}; known: {known}, or a path to a .py file")
    cfg = Config.fromfile(str(path))
    if model_cfg.get("kwargs"):
        cfg.merge_from_dict({"model": dict(model_cfg["kwargs"])})
    return cfg


def build_detector(model_cfg: Mapping[str, Any]) -> nn.Module:
    """An mmdet detector with mmdet's initialisation (random weights until a checkpoint is loaded)."""
    require_mmdet()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger

    register_all_modules(init_default_scope=True)
    cfg = detector_config(model_cfg)
    mmcv_kernels.check_detector_config(cfg.model)
    MMLogger.get_instance("mmengine").setLevel(logging.WARNING)  # init_weights lists every parameter
    model = MODELS.build(cfg.model)
    model.init_weights()
    from mmdet.datasets import CocoDataset

    model.dataset_meta = {"classes": CocoDataset.METAINFO["classes"]}
    model.eval()  # (some mmdet modules' train() return None)
    return model


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict (expected an mmdet checkpoint with 'state_dict')")
    return OrderedDict((k.removeprefix("module."), v) for k, v in state.items())


def convert_mmdet2_swin(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the original Swin detection repository (mmdet 2: `backbone.layers.*`, `attn.qkv`,
    `mlp.fc1`, `patch_embed.proj`) to mmdet 3's Swin, through mmdet's own converter (which also
    reorders the patch-merging channels)."""
    from mmdet.models.backbones.swin import swin_converter

    backbone = OrderedDict((k[len("backbone."):], v) for k, v in state.items() if k.startswith("backbone."))
    out = OrderedDict((k, v) for k, v in state.items() if not k.startswith("backbone."))
    out.update(swin_converter(backbone))
    return out


def load_detector_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an mmdet 3 checkpoint, or one in the mmdet 2 Swin repository's layout; a checkpoint that does
    not fit fails listing the missing and unexpected keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint={path} does not exist; pass an mmdet checkpoint (.pth)")
    state = _state_dict(path)
    layout = "mmdet 3"
    if any(k.startswith("backbone.layers.") for k in state):
        state, layout = convert_mmdet2_swin(state), "mmdet 2 Swin repository"
    missing, unexpected, shapes = state_diff(model.state_dict(), state)
    if missing or unexpected or shapes:
        detail = "; ".join(f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shape mismatch", shapes)) if keys)
        raise ValueError(f"checkpoint {path} ({layout} key layout) does not fit {type(model).__name__}: {detail}. "
                         "Check that model=... matches the checkpoint (Cascade vs Mask R-CNN, Swin-T vs Swin-S)")
    model.load_state_dict(state)
    return model


@torch.no_grad()
def backbone_sqnr(fp: nn.Module, quantized: nn.Module, batches: Sequence[Any]) -> list[float]:
    """SQNR (dB) of each backbone output level of a quantized detector against its float original, pooled
    over collated task batches (both backbones see the float detector's preprocessing of each batch)."""
    from vitq.report.sqnr import output_sqnr

    images = [fp.data_preprocessor(b, False)["inputs"] for b in batches]
    return output_sqnr(fp.backbone, quantized.backbone, images)


class DetectorForward(L.LightningModule):
    """Calibration forward: mmdet's preprocessing and inference on a batch (`validation_step`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def on_validation_start(self) -> None:
        self.model.data_preprocessor.to(self.device)  # mmengine keeps its own device record

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.model.test_step(batch)


class CocoEvalModule(EvalModule):
    """Predictions of every rank, gathered, then COCOeval's per-image matching per IoU type."""

    def __init__(self, model: nn.Module, prefix: str, metrics: tuple[str, ...], ann_file: str,
                 cat_ids: Sequence[int], img_ids: Sequence[int]) -> None:
        super().__init__(model, prefix, metrics)
        self.ann_file, self.cat_ids, self.img_ids = ann_file, list(cat_ids), list(img_ids)
        self.records: list[dict] = []

    def on_test_start(self) -> None:
        self.model.data_preprocessor.to(self.device)

    def on_test_epoch_start(self) -> None:
        self.records = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.records += [prediction_record(s) for s in self.model.test_step(batch)]

    def on_test_epoch_end(self) -> None:
        from pycocotools.coco import COCO
        import contextlib
        import io

        records = self.records
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        unique = {r["img_id"]: r for r in records}  # a padded DDP shard repeats images
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(self.ann_file)
        samples = evaluate_records(coco, list(unique.values()), self.cat_ids, self.img_ids)
        self.samples = {m: samples[m] for m in self.metric_names if m in samples}


@register_task("coco")
class CocoTask(Task):
    """COCO 2017 box and mask AP of an mmdet detector (primary: box AP)."""

    metrics = METRICS
    primary = "box_AP"
    weights_hint = ("pass model.checkpoint=<an mmdet 3 or Swin-repository checkpoint of this detector> (where to "
                    "get them: docs/coco.md); detectors are not trained here")

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg, model_cfg)
        self.root = check_layout(self.cfg.get("root"))
        require_mmdet()
        self.scale = test_scale(self.cfg.get("img_size"))
        self._datasets: dict[str, Any] = {}

    def dataset(self, split: str, with_annotations: bool = False, flip: float = 0.0):  # noqa: ANN201  (a CocoDataset)
        """train2017 or val2017 through mmdet's test pipeline (resize, pack); every image, none filtered.
        With annotations (boxes and masks, for the detector's losses) and `flip` > 0, random horizontal
        flips with that probability (the training pipeline of quantization-aware finetuning)."""
        key = f"{split}-{with_annotations}-{flip}"
        if key not in self._datasets:
            from mmdet.datasets import CocoDataset
            from mmdet.utils import register_all_modules

            register_all_modules(init_default_scope=True)
            pipeline = [dict(type="LoadImageFromFile")]
            if with_annotations:
                pipeline.append(dict(type="LoadAnnotations", with_bbox=True, with_mask=True))
            pipeline.append(dict(type="Resize", scale=self.scale, keep_ratio=True))
            if flip > 0:
                pipeline.append(dict(type="RandomFlip", prob=flip))
            meta = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor") + (("flip", "flip_direction")
                                                                                          if flip > 0 else ())
            pipeline.append(dict(type="PackDetInputs", meta_keys=meta))
            self._datasets[key] = CocoDataset(
                data_root=str(self.root), ann_file=LAYOUT[f"{split} annotations"],
                data_prefix=dict(img=LAYOUT[f"{split} images"] + "/"), test_mode=True, pipeline=pipeline)
        return self._datasets[key]

    def create_model(self, pretrained: bool) -> nn.Module:
        if pretrained:
            raise ValueError("detector weights come from model.checkpoint=<mmdet checkpoint>; "
                             "set model.pretrained=false")
        return build_detector(self.model_cfg)

    def load_weights(self, model: nn.Module, path: str) -> nn.Module:
        return load_detector_checkpoint(model, path)

    def identity(self) -> dict[str, Any]:
        return {"scale": list(self.scale)}

    def _eval_indices(self) -> list[int]:
        n = len(self.dataset("val"))
        limit = self.cfg.get("eval_limit")
        return list(range(min(n, int(limit)) if limit else n))

    def describe(self) -> dict[str, Any]:
        return {"name": "coco", "root": str(self.root), "split": "val2017", "test_size": len(self._eval_indices()),
                "scale": list(self.scale)}

    def collate_fn(self) -> Callable:
        from mmengine.dataset import pseudo_collate

        return pseudo_collate

    def _loader(self, dataset: Any, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate_fn(),
                          num_workers=int(self.cfg.get("num_workers") or 0))

    def _train_limit(self) -> int:
        n = len(self.dataset("train"))
        return min(n, int(self.cfg.get("train_limit") or n))

    def calib_loader(self, num_samples: int, batch_size: int, seed: int) -> DataLoader:
        train = self.dataset("train")
        limit = self._train_limit()
        if num_samples > limit:
            raise ValueError(f"quant.calib.num_samples={num_samples} but train2017 under {self.root} has {limit} "
                             "images; lower quant.calib.num_samples")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(limit, generator=g)[:num_samples].tolist()
        batch = min(batch_size, int(self.cfg.get("batch_size") or batch_size))  # detector batches are small
        return self._loader(CocoSubset(train, idx), batch)

    def calibration_module(self, model: nn.Module) -> L.LightningModule:
        return DetectorForward(model)

    def eval_module(self, model: nn.Module, prefix: str) -> EvalModule:
        val = self.dataset("val")
        img_ids = [val.get_data_info(i)["img_id"] for i in self._eval_indices()]
        return CocoEvalModule(model, prefix, self.metrics, str(self.root / LAYOUT["val annotations"]),
                              val.cat_ids, img_ids)

    def test_loader(self) -> DataLoader:
        return self._loader(CocoSubset(self.dataset("val"), self._eval_indices()), int(self.cfg.get("batch_size") or 1))

    def finetune_split(self, val_samples: int, seed: int) -> tuple[Dataset, Dataset]:
        """train2017 images with their boxes and masks (random flips) less `val_samples` held out (no flips)."""
        rest, held = hold_out(self._train_limit(), val_samples, seed, f"train2017 under {self.root}")
        return (CocoSubset(self.dataset("train", with_annotations=True, flip=0.5), rest),
                CocoSubset(self.dataset("train", with_annotations=True), held))

    def finetune_losses(self, student: nn.Module, teacher: nn.Module, batch: Any, temperature: float
                        ) -> dict[str, torch.Tensor]:
        """mmdet's detector losses of the quantized detector (summed as mmdet's `parse_losses` does), and
        the mean squared error of its backbone outputs against the float backbone's, averaged over levels."""
        data = student.data_preprocessor(batch, True)
        captured: list[Any] = []
        hook = student.backbone.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            losses = student.loss(data["inputs"], data["data_samples"])
        finally:
            hook.remove()
        task = sum(sum(v) if isinstance(v, (list, tuple)) else v for k, v in losses.items() if "loss" in k)
        with torch.no_grad():
            target = teacher.backbone(data["inputs"])
        feature = torch.stack([torch.nn.functional.mse_loss(s, t) for s, t in zip(captured[0], target)]).mean()
        return {"task": task, "feature": feature}

    def compare(self, fp: dict[str, Any], quant: dict[str, Any], metrics: tuple[str, ...]
                ) -> dict[str, tuple[float, float, float, float, float]]:
        return compare_ap(fp, quant, metrics)
