"""The tiny MNIST configuration the engine tests run (one block, 512 training images, one epoch)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
TINY = [
    "model.kwargs.embed_dim=32", "model.kwargs.depth=1", "model.kwargs.num_heads=2",
    "task.fit.epochs=1", "task.train_limit=512", "task.eval_limit=256", "task.batch_size=64",
    "quant=minmax", "quant.calib.num_samples=64", "logger=csv",
]


def csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV log's rows, each without its empty cells (a resumed log may have gained columns)."""
    import csv

    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def tiny_cfg(tmp_path: Path, *overrides: str, hydra: bool = False):
    base = [o for o in TINY if not (o.startswith("quant=") and any(x.startswith("quant=") for x in overrides))]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*base, f"paths.cache_dir={tmp_path / 'cache'}", *overrides],
                       return_hydra_config=hydra)


class StopFinetuneAt:
    """A Lightning callback (named by `+callbacks.stop._target_=tiny.StopFinetuneAt`): SIGTERM to this
    process when finetuning reaches epoch `epoch`, i.e. after the checkpoint of the epoch before."""

    def __new__(cls, epoch: int):  # noqa: ANN204  (a Callback subclass made here, so tiny imports no Lightning)
        import os
        import signal

        from lightning.pytorch.callbacks import Callback

        from vitq.engine.finetune import FinetuneModule

        class Stop(Callback):
            def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
                if isinstance(pl_module, FinetuneModule) and trainer.current_epoch == epoch:
                    os.kill(os.getpid(), signal.SIGTERM)

        return Stop()
