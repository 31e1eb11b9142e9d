"""The SLURM launcher config, and a real job through submitit's local executor (the same launcher code
path as SLURM: the job runs in another process from the pickled config)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

import vitq.engine.config  # noqa: F401  (the resolvers the launcher config uses)

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def _launcher(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "trainer=ddp", *overrides],
                      return_hydra_config=True)
    return cfg.hydra.launcher


def test_slurm_launcher_one_task_per_device_on_every_node():
    launcher = _launcher("trainer.devices=4", "trainer.num_nodes=2")
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.max_num_timeout == 3 and launcher.signal_delay_s == 120  # submitit requeues; vitq resumes
    cpu = _launcher("trainer.devices=2", "trainer.accelerator=cpu")
    assert (cpu.tasks_per_node, cpu.gpus_per_node, cpu.nodes) == (2, 0, 1)


@pytest.mark.parametrize("env, subdir, log", [({}, ".hydra", "train.log"),
                                              ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, ".hydra", "train.log"),
                                              ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}, ".hydra.rank3", "train.rank3.log"),
                                              ({"RANK": "1"}, ".hydra.rank1", "train.rank1.log")])
def test_every_rank_of_an_srun_job_writes_its_own_hydra_files(monkeypatch, env, subdir, log):
    """srun starts every rank as a Hydra job in the one job directory: rank 0 keeps .hydra/ and train.log."""
    for key in ("SLURM_NTASKS", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    handler = cfg.hydra.job_logging.handlers.file
    assert cfg.hydra.output_subdir == subdir
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir, cfg.hydra.job.name = "/run", "train"
    assert handler.filename == f"/run/{log}"


def test_slurm_launcher_needs_a_device_count():
    launcher = _launcher()  # trainer=ddp leaves devices=-1 ("all visible"), which SLURM cannot request
    with pytest.raises(InterpolationResolutionError, match="needs trainer.devices=<devices per node>"):
        OmegaConf.to_container(launcher, resolve=True)


def test_a_tiny_job_through_submitit_local_writes_results(tmp_path):
    """The job runs in a process submitit starts; it lands in the sweep directory the launcher announced
    (the run tag is copied with the config, not drawn again) and writes results.json."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=10", "model.kwargs.embed_dim=32", "model.kwargs.depth=1",
         "model.kwargs.num_heads=2", "task.fit.epochs=1", "task.train_limit=256", "task.eval_limit=64",
         "quant=minmax", "quant.calib.num_samples=32", "logger=csv", f"paths.cache_dir={tmp_path / 'cache'}",
         f"paths.output_root={tmp_path / 'out'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    announced = Path(re.search(r"Submitit 'local' sweep output dir : (\S+)", output).group(1))
    assert [p.name for p in (tmp_path / "out" / "multirun").iterdir()] == [announced.name]
    results = list(announced.glob("*/results.json"))
    assert [r.parent.name for r in results] == ["0-vit_mnist-mnist-minmax"], output[-3000:]
    assert list((announced / ".submitit").glob("*/*_0_log.out"))  # submitit ran it as a job
