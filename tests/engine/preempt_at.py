"""A Lightning callback that delivers SIGUSR2 to its own process at a given global step, as submitit's
warning before a time limit would: every rank at the same step, each once (a marker file per rank), so
the requeued attempt, started with the same command line, runs through."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


class PreemptAt(L.Callback):
    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = int(step), marker

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        done = Path(f"{self.marker}.rank{trainer.global_rank}")
        if trainer.global_step == self.step and not done.exists():
            done.write_text("signalled\n")
            os.kill(os.getpid(), signal.SIGUSR2)
