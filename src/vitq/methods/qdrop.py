"""QDrop (Wei et al., ICLR 2022): block reconstruction on plain uniform quantizers, learning each weight's
rounding (AdaRound) and every activation step (LSQ) jointly, while each activation element keeps its
quantized value only with probability p (else its float value), and each unit's input mixes the quantized
and the float model's inputs element-wise with the same p. The drop exists only while a unit is
optimized; the finished model quantizes every activation.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..quant.reconstruct import ReconstructOptions
from .base import Method, register_method


@dataclasses.dataclass
class QDropOptions:
    keep_prob: float = 0.5  # p: an activation element keeps its quantized value with this probability
    iters: int = 20000  # per unit
    recon_batch_size: int = 32
    adaround_lr: float = 1e-3  # rounding gates
    adaround_schedule: str = "constant"  # the gates' lr: constant (QDrop's code) or cosine (decayed with LSQ)
    lsq_lr: float = 4e-5  # activation steps
    reg_weight: float = 0.01  # lambda of the rounding regularizer (beta 20 -> 2 after the warm-up)
    warmup: float = 0.2
    # a step's mini-batch: replacement, independent draws (QDrop's `torch.randint`, recon.py:147) |
    # permutation, distinct samples (BRECQ's randperm, the former default)
    recon_draw: str = "replacement"


@register_method
class QDrop(Method):
    name = "qdrop"
    stages = ("calibrate", "reconstruct")
    Options = QDropOptions

    def reconstruct_passes(self, model: nn.Module) -> list[ReconstructOptions]:
        o = self.options
        if not 0.0 < o.keep_prob <= 1.0:
            raise ValueError(f"quant.keep_prob={o.keep_prob} must be in (0, 1] (QDrop uses 0.5)")
        return [ReconstructOptions(iters=o.iters, batch_size=o.recon_batch_size, input_source="mix",
                                   mix_prob=o.keep_prob, adaround=True, adaround_lr=o.adaround_lr,
                                   adaround_schedule=o.adaround_schedule,
                                   reg_weight=o.reg_weight, warmup=o.warmup, lsq=True, lsq_lr=o.lsq_lr,
                                   drop_prob=1.0 - o.keep_prob, draw=o.recon_draw)]
