"""What a finished run gives W&B beyond the metrics Lightning logs: the result row with its confidence
intervals in the run summary, the run's figures as images, and (opt-in, `log_checkpoint=true`) the
quantized checkpoint as a model artifact. Lightning's `log_model` is not used: it uploads Lightning's
training checkpoints, not the model vitq saves."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

FIGURES = ("layernorm_ranges.png", "finetune_curves.png")


def summary_of(row: dict[str, Any]) -> dict[str, Any]:
    """The result row for W&B's summary: every column, each confidence interval as `<key>_low/_high`."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key.endswith("_ci") and isinstance(value, (list, tuple)) and len(value) == 2:
            out[f"{key}_low"], out[f"{key}_high"] = value
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        else:
            out[key] = str(value)
    return out


def publish(loggers: list[Logger], out_dir: Path, row: dict[str, Any] | None, log_checkpoint: bool,
            name: str) -> None:
    """Rank 0, every W&B logger of the run."""
    runs = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not runs or rank_zero_only.rank != 0:
        return
    import wandb

    for lg in runs:
        experiment = lg.experiment
        if row:
            experiment.summary.update(summary_of(row))
        images = {f"figures/{Path(f).stem}": wandb.Image(str(out_dir / f)) for f in FIGURES if (out_dir / f).is_file()}
        if images:
            experiment.log(images)
        ckpt = out_dir / "quantized.ckpt"
        if log_checkpoint and ckpt.is_file():
            artifact = wandb.Artifact(f"{name}-quantized", type="model",
                                      metadata={k: v for k, v in summary_of(row or {}).items()
                                                if k in ("recipe", "setting", "quant_top1", "delta_top1")})
            artifact.add_file(str(ckpt))
            experiment.log_artifact(artifact)
