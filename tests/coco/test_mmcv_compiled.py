"""Where the compiled mmcv is installed (`make mmcv`): the detector's outputs with vitq's torchvision kernels
are bit-identical to those with mmcv's compiled kernels (predictions, masks, every loss and gradient)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitq import mmcv_kernels

from .conftest import needs_mmdet

ROOT = Path(__file__).resolve().parents[2]


def _compiled_mmcv() -> bool:
    try:
        import mmcv
    except ImportError:
        return False
    return mmcv_kernels._compiled_ext_spec(mmcv.__path__) is not None


pytestmark = [needs_mmdet, pytest.mark.skipif(not _compiled_mmcv(), reason=(
    "compiled mmcv not installed (mmcv-lite has no mmcv._ext to compare with; `make mmcv` installs it)"))]


def _outputs(coco_root: Path, out: Path, kernels: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, mmcv_kernels.ENV: kernels, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "tests.coco.detector_outputs", str(coco_root), str(out)], cwd=ROOT,
                   env=env, check=True, timeout=900)
    return torch.load(out)


def test_vitq_kernels_reproduce_compiled_mmcv_bit_for_bit(coco_mini_root, tmp_path):
    compiled = _outputs(coco_mini_root, tmp_path / "compiled.pt", "auto")
    ours = _outputs(coco_mini_root, tmp_path / "torchvision.pt", "torchvision")
    assert bool(compiled.pop("provider")) and not bool(ours.pop("provider"))
    assert compiled.keys() == ours.keys()
    assert sum(k.startswith("loss.") for k in ours) >= 14 and len(ours["0.bboxes"]) > 0
    assert ours["0.masks"].any()
    different = [k for k in ours if not torch.equal(ours[k], compiled[k])]
    assert not different, different
