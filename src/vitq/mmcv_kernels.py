"""mmcv's compiled kernels that mmdet's (Cascade) Mask R-CNN calls, provided through torchvision.

mmcv-lite is mmcv's Python package without the compiled `mmcv._ext`, whose build takes 17 to 26 minutes
on 2 cores (and a CUDA toolchain on GPU machines). mmcv loads every kernel from `mmcv._ext` when
`mmcv.ops` is imported, so `import vitq` puts an import hook in front of that module: where no compiled
`_ext` is installed (or `VITQ_MMCV_KERNELS=torchvision` asks for it), `mmcv._ext` becomes a module with
the three kernels these detectors call, on CPU and CUDA alike:

- `roi_align_forward` / `roi_align_backward` (average mode): torchvision's RoIAlign, the same bilinear
  sampling, written into mmcv's output tensors;
- `nms`: the scores sorted as mmcv's kernel sorts them (not stably), then torchvision's greedy NMS on
  that order; the threshold is compared in single precision, as mmcv does. `offset=1` (legacy areas
  with +1) has no torchvision kernel and runs as the same greedy loop in PyTorch.

mmcv's own Python code (score threshold, `max_num`, the score column, `batched_nms` with its per-class
offsets, `split_thr` and `class_agnostic`) runs unchanged above these kernels. Every other kernel name
resolves to a function that raises `MissingKernelError`, naming the kernel, the mmcv.ops module that
uses it and the fix (`scripts/install_mmcv.sh`); `check_detector_config` finds such ops in a detector
config before anything runs.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Any, Iterator, Mapping

import torch

ENV = "VITQ_MMCV_KERNELS"
MODES = ("auto", "torchvision")  # auto: compiled mmcv where installed, else torchvision's
INSTALL_HINT = ("install the compiled mmcv in place of mmcv-lite: `bash scripts/install_mmcv.sh .venv/bin/python` "
                "(17 to 26 minutes on 2 cores; docs/coco.md)")
PROVIDED_KERNELS = ("roi_align_forward", "roi_align_backward", "nms")
# names a detector config may give as `type` whose work these kernels cover (RoIAlign in average mode)
PROVIDED_OPS = ("RoIAlign", "roi_align", "nms", "batched_nms")


class MissingKernelError(NotImplementedError):
    """An mmcv kernel that mmcv-lite lacks and vitq does not provide."""


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(MODES)}: 'auto' uses the compiled mmcv "
                         "where it is installed and torchvision's kernels elsewhere, 'torchvision' always uses the latter")
    return value


def _compiled_ext_spec(path: Any) -> importlib.machinery.ModuleSpec | None:
    return importlib.machinery.PathFinder.find_spec("mmcv._ext", path)


def provider() -> str:
    """'mmcv' (the compiled kernels) or 'torchvision' (this module's), as `import mmcv.ops` will choose."""
    loaded = sys.modules.get("mmcv._ext")
    if loaded is not None:
        return "torchvision" if isinstance(loaded, TorchvisionExt) else "mmcv"
    if mode() == "torchvision":
        return "torchvision"
    try:
        import mmcv
    except ImportError:
        return "torchvision"
    return "mmcv" if _compiled_ext_spec(mmcv.__path__) is not None else "torchvision"


class TorchvisionExt(types.ModuleType):
    """`mmcv._ext` with the provided kernels; any other name is a function that raises."""

    def __init__(self) -> None:
        super().__init__("mmcv._ext", __doc__)
        self.__file__ = __file__
        self.requested_by: dict[str, str] = {}  # missing kernel -> the mmcv.ops module that loaded it
        self.roi_align_forward = roi_align_forward
        self.roi_align_backward = roi_align_backward
        self.nms = nms

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        # mmcv's load_ext asks with hasattr() at import time, from the frame of the mmcv.ops module
        caller = sys._getframe(1)
        while caller is not None and caller.f_globals.get("__name__", "").startswith(("mmcv.utils", __name__)):
            caller = caller.f_back
        module = caller.f_globals.get("__name__", "?") if caller is not None else "?"
        self.requested_by.setdefault(name, module)
        return _missing(name, self.requested_by[name])


def _missing(kernel: str, module: str):  # noqa: ANN202
    def raise_missing(*args: Any, **kwargs: Any) -> None:
        raise MissingKernelError(
            f"mmcv kernel '{kernel}' (used by {module}) is not available: mmcv-lite has no compiled ops and vitq "
            f"provides only {', '.join(PROVIDED_KERNELS)} through torchvision (what Mask / Cascade Mask R-CNN "
            f"call); a detector that uses {module.rsplit('.', 1)[-1]} needs the compiled mmcv: {INSTALL_HINT}")
    raise_missing.__name__ = kernel
    return raise_missing


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return TorchvisionExt()

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    """Answers only for `mmcv._ext`, and only where the compiled one is absent or not wanted."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "mmcv._ext":
            return None
        if mode() == "auto" and _compiled_ext_spec(path) is not None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), origin=__file__)


def install() -> None:
    """Put the hook in front of the import system (idempotent; nothing is imported now)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


# ---------------------------------------------------------------------------------------------- kernels
def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                      sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """mmcv's `roi_align_forward`: fills `output` [K, C, aligned_height, aligned_width]."""
    from torchvision.ops import roi_align

    _average_only(pool_mode)
    if aligned and rois.device.type == "cpu" and rois.numel():  # mmcv's CPU kernel asserts this
        size = rois[:, 3:5] - rois[:, 1:3]
        if bool((size < 0).any()):
            raise ValueError("ROIs in ROIAlign cannot have non-negative size!")
    output.copy_(roi_align(input, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned))


def roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor, argmax_y: torch.Tensor, argmax_x: torch.Tensor,
                       grad_input: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                       sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """mmcv's `roi_align_backward`: fills `grad_input` (the feature map's shape)."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    _average_only(pool_mode)
    n, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, spatial_scale, aligned_height, aligned_width, n, c, h, w, sampling_ratio, aligned))


def _average_only(pool_mode: int) -> None:
    if pool_mode != 1:
        raise MissingKernelError(f"RoIAlign with pool_mode='max' is not available: torchvision's RoIAlign averages, "
                                 f"and mmcv-lite has no compiled ops; use pool_mode='avg' or {INSTALL_HINT}")


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int) -> torch.Tensor:
    """mmcv's `nms` kernel: indices of the kept boxes, highest score first."""
    if offset not in (0, 1):
        raise ValueError(f"nms offset must be 0 or 1, got {offset}")
    if boxes.numel() == 0:
        return boxes.new_empty((0,), dtype=torch.long)
    threshold = float(torch.tensor(iou_threshold, dtype=torch.float32))  # mmcv's kernel takes a C float
    order = scores.sort(0, descending=True)[1]  # mmcv's order for tied scores (torchvision sorts stably)
    if offset == 0:
        from torchvision.ops import nms as tv_nms

        # on the sorted boxes torchvision's stable sort is the identity, so both visit boxes in mmcv's order
        return order[tv_nms(boxes[order], scores[order], threshold)]
    return order[_greedy_nms_sorted(boxes[order].float(), threshold, offset)]


def _greedy_nms_sorted(boxes: torch.Tensor, threshold: float, offset: int) -> torch.Tensor:
    """Greedy NMS over boxes already in visiting order, with mmcv's arithmetic (areas and overlaps +offset)."""
    x1, y1, x2, y2 = (boxes[:, i].contiguous() for i in range(4))
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    thr = torch.tensor(threshold, dtype=boxes.dtype, device=boxes.device)
    for i in range(len(boxes)):
        if not keep[i]:
            continue
        w = (torch.minimum(x2[i], x2[i + 1:]) - torch.maximum(x1[i], x1[i + 1:]) + offset).clamp_min(0)
        h = (torch.minimum(y2[i], y2[i + 1:]) - torch.maximum(y1[i], y1[i + 1:]) + offset).clamp_min(0)
        inter = w * h
        keep[i + 1:] &= ~(inter / (areas[i] + areas[i + 1:] - inter) > thr)
    return keep.nonzero().squeeze(1)


# ------------------------------------------------------------------------------- detector config check
def _ops_in(config: Any, key: str = "model") -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    if isinstance(config, Mapping):
        if isinstance(config.get("type"), str):
            yield key, config["type"], config
        for k, v in config.items():
            yield from _ops_in(v, f"{key}.{k}")
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            yield from _ops_in(v, f"{key}[{i}]")


def _module_of(obj: Any) -> str:
    """Where an mmcv.ops object lives (an autograd Function's `apply` reports torch's module, not its own)."""
    owner = getattr(obj, "__self__", None)
    return str(getattr(owner if isinstance(owner, type) else obj, "__module__", None) or "")


def missing_ops(model_config: Mapping[str, Any]) -> list[str]:
    """`key (type=X, module)` for every op in a detector config that needs a kernel this module lacks."""
    if provider() != "torchvision":
        return []
    import mmcv.ops
    from mmengine.registry import MODELS

    ext = sys.modules["mmcv._ext"]
    needy_modules = set(ext.requested_by.values())  # mmcv.ops modules that loaded a missing kernel
    found = []
    for key, name, cfg in _ops_in(model_config):
        module = next((m for m in map(_module_of, (MODELS.module_dict.get(name), getattr(mmcv.ops, name, None)))
                       if m.startswith("mmcv.ops")), None)
        if module is None:
            continue
        max_pool = name == "RoIAlign" and cfg.get("pool_mode") == "max"  # torchvision's RoIAlign averages
        if max_pool or (name not in PROVIDED_OPS and module in needy_modules):
            found.append(f"{key} (type={name}, {module})")
    return found


def check_detector_config(model_config: Mapping[str, Any]) -> None:
    """Refuse, before anything runs, a detector whose config asks for an op that would raise later."""
    found = missing_ops(model_config)
    if found:
        raise MissingKernelError(f"the detector config asks for mmcv ops without a kernel here: {'; '.join(found)}. "
                                 f"mmcv-lite has no compiled ops and vitq provides only RoIAlign (average) and NMS "
                                 f"through torchvision; {INSTALL_HINT}")
