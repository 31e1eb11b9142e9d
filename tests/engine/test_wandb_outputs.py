"""What a finished run gives W&B, read back from the offline run's own file: the result row with its
confidence intervals in the summary, the figures as images, the quantized checkpoint as an artifact when
asked (`log_checkpoint=true`), the run id of the directory and the nested recipe config."""
from __future__ import annotations

import json

from vitq.engine.run import run
from vitq.engine.wandb_outputs import summary_of

from tiny import tiny_cfg
from wandb_records import records, summary


def test_the_summary_splits_each_interval_and_keeps_every_column():
    row = {"recipe": "minmax", "quant_top1": 91.5, "delta_top1_ci": [-2.0, 0.5], "eval_samples": 256,
           "finetune_resumed": False, "integer": None, "finetune_trained": {"steps": 3}}
    assert summary_of(row) == {"recipe": "minmax", "quant_top1": 91.5, "delta_top1_ci_low": -2.0,
                               "delta_top1_ci_high": 0.5, "eval_samples": 256, "finetune_resumed": False,
                               "integer": None, "finetune_trained": "{'steps': 3}"}


def test_a_finetuned_run_logs_its_results_figures_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    cfg = tiny_cfg(tmp_path, "logger=wandb", "log_checkpoint=true", "quant.finetune.epochs=1",
                   "quant.finetune.val_samples=64", "quant.finetune.batch_size=64")
    assert tiny_cfg(tmp_path).log_checkpoint is False  # the upload is opt-in
    run(cfg, out)
    row = json.loads((out / "results.json").read_text())
    run_id = (out / ".wandb-id").read_text().strip()
    (attempt,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    path = attempt / f"run-{run_id}.wandb"

    got = summary(path)
    for key in ("quant_top1", "fp_top1", "delta_top1", "recipe", "setting", "finetune_val_loss"):
        assert got[key] == row[key], key
    assert [got["delta_top1_ci_low"], got["delta_top1_ci_high"]] == row["delta_top1_ci"]
    kinds = {r.WhichOneof("record_type"): r for r in records(path)}
    assert kinds["run"].run.run_id == run_id
    config = {item.key: json.loads(item.value_json) for item in kinds["config"].config.update}
    assert config["quant"]["w_bits"] == 8 and config["quant"]["name"] == "minmax"  # the nested recipe
    artifact = kinds["artifact"].artifact
    assert artifact.name == "vit_mnist-mnist-minmax-quantized" and artifact.type == "model"
    assert [m.path for m in artifact.manifest.contents] == ["quantized.ckpt"]
    assert (out / "finetune_curves.png").is_file()
    assert list((attempt / "files" / "media" / "images" / "figures").glob("finetune_curves_*.png"))
