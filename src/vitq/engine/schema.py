"""The typed settings of a run: one schema per config group (checked by `engine.config.validate`),
and `RunConfig`, the checked settings the stages read."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..quant.recipe import Recipe


@dataclass
class ModelConf:
    name: str = "???"
    arch: str = "???"
    pretrained: bool = False
    checkpoint: Optional[str] = None
    kwargs: dict = field(default_factory=dict)


@dataclass
class FitConf:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    # train-time augmentation, built by tasks/classification.py (absent keys keep the task's default)
    augment: Optional[str] = None  # cifar10 / ImageFolder: null, "trivialaugment", "randaugment", "autoaugment"
    affine: Optional[dict] = None  # mnist: kwargs of torchvision's RandomAffine; null: translate 0.1
    random_erasing: float = 0.0  # probability of timm's RandomErasing (per image, after normalization)
    # batch mixing and threads, in tasks/classification.py (ClassificationModule)
    mixup: float = 0.0  # timm Mixup alpha (0: off)
    cutmix: float = 0.0  # timm CutMix alpha (0: off)
    num_threads: Optional[int] = None  # torch intra-op threads while training; null: leave as is


@dataclass
class TaskConf:
    name: str = "???"
    root: Optional[str] = None
    eval_root: Optional[str] = None  # ImageFolder root whose val/ is the evaluation split; null: root
    batch_size: int = 128
    num_workers: int = 0
    img_size: Optional[int] = None
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    skip_bad_images: bool = False  # leave unreadable image files out (with a warning naming them), not fail
    fit: FitConf = field(default_factory=FitConf)


@dataclass
class CalibConf:
    num_samples: int = 256
    batch_size: int = 32
    seed: int = 0


@dataclass
class FinetuneConf:
    """Quantization-aware finetuning after the recipe's stages (the `finetune` stage, docs/finetune.md)."""

    epochs: int = 0  # 0: no finetuning
    lr: float = 1.0e-4  # quantizer steps and zero points (LSQ / LSQ+)
    weights: bool = False  # also train the weights of the quantized layers
    weight_lr: Optional[float] = None  # null: lr
    weight_decay: float = 0.0  # on the weights only
    warmup_epochs: int = 0  # linear warm-up, then cosine decay to 0 (per step)
    batch_size: Optional[int] = None  # null: task.batch_size
    temperature: float = 2.0  # of the logit distillation (KL, scaled by T^2)
    task_weight: float = 1.0  # the task's own loss (cross-entropy; mmdet's detector losses)
    kd_weight: float = 1.0  # KL(teacher || student) on logits (classification)
    feature_weight: float = 1.0  # MSE between quantized and float backbone outputs (detection)
    zero_points: bool = True  # learn asymmetric grids' zero points too
    train_mode: bool = False  # false: dropout and normalization statistics as in evaluation
    val_samples: int = 500  # training images held out for the validation loop (never evaluation images)
    grad_clip: Optional[float] = None  # clip the gradient norm
    seed: int = 0  # shuffling, augmentation and the held-out split
    ckpt_path: Optional[str] = None  # resume: "last" (this run directory's last checkpoint) or a finetune .ckpt
    every_n_train_steps: int = 500  # also a checkpoint every N steps (a preempted epoch resumes there); 0: per epoch


@dataclass
class QuantConf:
    name: str = "???"
    scope: str = "matmul"
    calib_flow: str = "float"  # float | quantized | quantized_activations (docs/methods.md)
    w_bits: int = 8
    a_bits: int = 8
    attn_bits: int = 8
    observer: str = "minmax"
    calib: CalibConf = field(default_factory=CalibConf)
    weight: Optional[dict] = None
    activation: Optional[dict] = None
    linear_input: Optional[dict] = None
    matmul_input: Optional[dict] = None
    softmax_output: Optional[dict] = None
    norm_input: Optional[dict] = None
    linear_output: Optional[dict] = None
    softmax_input: Optional[dict] = None
    overrides: list = field(default_factory=list)
    from_checkpoint: Optional[str] = None
    finetune: FinetuneConf = field(default_factory=FinetuneConf)
    method: str = "ptq"  # hooks around calibration (vitq/methods/); its switches are further keys


@dataclass
class AnalyzeConf:
    """Per-point sensitivity (`stage=analyze`, docs/deploy.md), and keeping its top points wider in a run."""

    samples: int = 256  # images the analysis runs on
    batch_size: int = 64
    split: str = "train"  # train: a draw of training images (never the evaluation images) | eval
    seed: int = 1  # the draw of training images (the calibration draw uses quant.calib.seed)
    top: int = 10  # rows of the printed table
    keep: int = 4  # how many of the most sensitive points the proposed overrides (and `apply`) keep wider
    keep_bits: Optional[int] = 8  # their bits; null: float
    apply: Optional[str] = None  # a sensitivity.csv: this run keeps its `keep` top points at `keep_bits`


@dataclass
class ExportConf:
    """ONNX export with Q/DQ pairs (`stage=export`, docs/deploy.md)."""

    opset: int = 17
    check_samples: Optional[int] = None  # evaluation images onnxruntime is checked on; null: all
    float_export: bool = True  # also export the float model (file size and speed against it)


@dataclass(frozen=True)
class RunConfig:
    """The run's settings as `validate` checked them, resolved once: what the stages read (the trainer,
    logger and callback groups stay with the raw config, which builds those objects)."""

    model: dict[str, Any]  # the model group, resolved (as the task and a checkpoint's meta get it)
    task: dict[str, Any]
    quant: dict[str, Any]
    recipe: Recipe
    calib: CalibConf
    finetune: FinetuneConf
    seed: int
    stage: str
    cache_dir: Optional[str] = None
    from_checkpoint: Optional[str] = None
    analyze: AnalyzeConf = field(default_factory=AnalyzeConf)
    export: ExportConf = field(default_factory=ExportConf)

    def meta(self) -> dict[str, Any]:
        """What a saved quantized checkpoint records of the run that made it."""
        return {"model": self.model, "task": self.task, "quant": self.quant}
