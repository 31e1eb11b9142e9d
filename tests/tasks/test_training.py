"""The training side of ClassificationModule: weight-decay groups, batch mixing, thread count."""
from __future__ import annotations

import lightning as L
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitq.tasks.classification import ClassificationModule


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", num_classes=4, in_chans=1, img_size=8, patch_size=4,
                             embed_dim=16, depth=1, num_heads=2)


def test_mixup_training_restores_threads_and_skips_decay_on_norms():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(20, 1, 8, 8), torch.randint(0, 4, (20,)))
    module = ClassificationModule(tiny_vit(), lr=1e-3, epochs=1, warmup_epochs=1, label_smoothing=0.1,
                                  mixup=0.8, cutmix=1.0, num_threads=1)
    before = torch.get_num_threads()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=6))  # batches 6, 6, 6, 2: all even, all mixed
    assert torch.get_num_threads() == before
    assert torch.isfinite(trainer.callback_metrics["float/train_loss"])
    groups = trainer.optimizers[0].param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    model = module.model
    assert id(model.pos_embed) not in decayed and id(model.norm.weight) not in decayed
    assert id(model.blocks[0].attn.qkv.weight) in decayed


def test_odd_batch_falls_back_to_plain_cross_entropy():
    module = ClassificationModule(tiny_vit(), mixup=0.8)
    loss = module.training_step((torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
