"""Preemption and requeue without SLURM: the signal submitit sends (SIGUSR2), the environment a requeued job
sees, the lock a SIGKILLed attempt leaves, and a two-process run preempted mid-finetune that, started again
as a requeue starts it, ends with the weights and metrics of an uninterrupted run, in one W&B run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vitq.engine.finetune import resume_plan
from vitq.engine.lifecycle import LOCK, DirectoryInUse, RunInterrupted, acquire, signals_end_the_run
from vitq.engine.run import PREEMPTED, is_requeue, make_trainer_factory
from vitq.engine.schema import FinetuneConf

from tiny import csv_rows

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def test_usr2_runs_submitits_handler_then_ends_the_run_as_preempted():
    calls = []

    def submitit_like(signum, frame):  # noqa: ANN001, ANN202  (rank 0: pickle, `scontrol requeue`, exit)
        calls.append(signum)
        raise SystemExit(-1)

    before = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        with pytest.raises(RunInterrupted) as caught, signals_end_the_run():
            os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [signal.SIGUSR2] and caught.value.preempted and caught.value.exit_code == 140
        assert isinstance(caught.value.__cause__, SystemExit)
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # restored after the run
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # no submitit: the run still ends as preempted
        with pytest.raises(RunInterrupted) as caught, signals_end_the_run():
            os.kill(os.getpid(), signal.SIGUSR2)
        assert caught.value.preempted and caught.value.__cause__ is None
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_requeued_attempt_of_the_same_slurm_job_takes_over_its_lock(tmp_path, monkeypatch):
    """An attempt SIGKILLed (OOM, KillWait) leaves its lock; the requeue may land on another node."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for job, task in (("4242", None), ("4242", "3")):
            (tmp_path / LOCK).write_text(f"{holder.pid} other-node {job}_{task or ''}\n")
            monkeypatch.setenv("SLURM_JOB_ID", "999")  # another job: refused, live or not
            monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
            monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
            with pytest.raises(DirectoryInUse, match="pid .* on other-node"):
                acquire(tmp_path)
            if task is None:
                monkeypatch.setenv("SLURM_JOB_ID", job)
            else:  # an array job: the array's job id and this task's index
                monkeypatch.setenv("SLURM_ARRAY_JOB_ID", job)
                monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
            lock = acquire(tmp_path)  # the same job (and array index): its own stale lock
            assert lock.read_text() == f"{os.getpid()} {socket.gethostname()} {job}_{task or ''}\n"
            lock.unlink()
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")  # another task of the same array: refused
        (tmp_path / LOCK).write_text(f"{holder.pid} other-node 4242_3\n")
        with pytest.raises(DirectoryInUse):
            acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_requeue_is_known_by_its_marker_or_slurms_restart_count(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert not is_requeue(tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not is_requeue(tmp_path)
    (tmp_path / PREEMPTED).write_text("interrupted (SIGUSR2)")
    assert is_requeue(tmp_path)
    (tmp_path / PREEMPTED).unlink()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued after an attempt that wrote nothing
    assert is_requeue(tmp_path)


def test_resume_plans(tmp_path):
    on = FinetuneConf(epochs=2)
    assert resume_plan(on, tmp_path) == resume_plan(on, tmp_path, requeued=False)
    assert resume_plan(on, tmp_path).start is None and not resume_plan(on, tmp_path).error
    plan = resume_plan(FinetuneConf(epochs=2, ckpt_path="last"), tmp_path)  # asked for, nothing there: fails
    assert "holds no finetune checkpoint" in plan.error and "finetune/last.ckpt" in plan.error
    plan = resume_plan(on, tmp_path, requeued=True)  # preempted before finetuning: starts over, says so
    assert plan.start is None and not plan.error and "starts from the beginning" in plan.note
    folder = tmp_path / "finetune"
    folder.mkdir()
    (folder / "start.ckpt").write_text("")
    plan = resume_plan(on, tmp_path, requeued=True)  # preempted before the first checkpoint
    assert (plan.start, plan.ckpt) == (folder / "start.ckpt", None)
    (folder / "step9.ckpt").write_text("")
    (folder / "last.ckpt").symlink_to("step9.ckpt")
    for plan in (resume_plan(on, tmp_path, requeued=True), resume_plan(FinetuneConf(epochs=2, ckpt_path="last"), tmp_path),
                 resume_plan(FinetuneConf(epochs=2, ckpt_path=str(folder / "last.ckpt")), tmp_path / "elsewhere")):
        assert (plan.start, plan.ckpt, plan.error) == (folder / "start.ckpt", folder / "last.ckpt", "")
    assert resume_plan(FinetuneConf(epochs=0), tmp_path, requeued=True).start is None  # nothing to finetune


def test_under_slurm_lightning_leaves_the_requeue_to_submitit(monkeypatch):
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "vitq", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(key, value)
    cfg = OmegaConf.create({"trainer": {"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1},
                            "callbacks": {}})
    trainer = make_trainer_factory(cfg, [])()
    env = trainer._accelerator_connector.cluster_environment
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False


def _train(out_dir: Path, cache: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model.kwargs.embed_dim=32", "model.kwargs.depth=1",
         "model.kwargs.num_heads=2", "task.fit.epochs=1", "task.train_limit=512", "task.eval_limit=128",
         "task.batch_size=64", "quant=minmax", "quant.w_bits=4", "quant.a_bits=4", "quant.calib.num_samples=64",
         "quant.calib.batch_size=32", "quant.finetune.epochs=2", "quant.finetune.val_samples=64",
         "quant.finetune.batch_size=32", "quant.finetune.every_n_train_steps=3", "quant.finetune.lr=1e-3",
         f"paths.cache_dir={cache}", f"hydra.run.dir={out_dir}", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_two_process_run_preempted_mid_finetune_resumes_by_itself_to_the_same_result(tmp_path):
    cache = tmp_path / "cache"
    first = _train(tmp_path / "float", cache, "quant.finetune.epochs=0", "logger=csv")  # trains and caches
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    plain = _train(tmp_path / "plain", cache, *ddp)
    assert plain.returncode == 0, (plain.stdout + plain.stderr)[-3000:]

    # 448 finetuning images, 2 processes, batches of 32: 7 steps per epoch; step checkpoints at 3, 6, 9;
    # SIGUSR2 on both ranks after step 10 (epoch 1, its 3rd step): the last checkpoint is mid-epoch
    out = tmp_path / "preempted"
    preempt = ["+callbacks.preempt._target_=preempt_at.PreemptAt", "+callbacks.preempt.step=10",
               f"+callbacks.preempt.marker={tmp_path / 'signalled'}"]
    stopped = _train(out, cache, *ddp, *preempt)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGUSR2, log[-3000:]
    assert (out / PREEMPTED).read_text().startswith("interrupted (SIGUSR2)")
    assert not (out / "FAILED").exists() and not (out / "results.json").exists()
    assert sorted(p.name for p in (out / "finetune").glob("*.ckpt")) == ["epoch0.ckpt", "last.ckpt", "start.ckpt",
                                                                        "step9.ckpt"]
    history = csv_rows(out / "csv" / "metrics.csv")
    assert history

    resumed = _train(out, cache, *ddp, *preempt)  # the requeue: the same command line, the same directory
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "requeued: finetuning resumes from" in log and "step9.ckpt" in log
    assert not (out / PREEMPTED).exists()

    a = torch.load(tmp_path / "plain" / "quantized.ckpt", weights_only=False)["state_dict"]
    b = torch.load(out / "quantized.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # every weight and step, bit for bit
    row_a, row_b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "plain", out))
    for key in ("quant_top1", "quant_top5", "delta_top1", "delta_top1_ci", "finetune_val_loss"):
        assert row_a[key] == row_b[key], key
    assert row_b["finetune_resumed"] is True

    # one W&B run: both attempts wrote offline runs under the directory's id; the CSV history is kept
    run_id = (out / ".wandb-id").read_text().strip()
    attempts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(f"-{run_id}") for p in attempts), attempts
    assert all((p / f"run-{run_id}.wandb").is_file() for p in attempts)
    final = csv_rows(out / "csv" / "metrics.csv")
    assert len(final) > len(history) and all(row in final for row in history)
