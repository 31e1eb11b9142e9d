"""Runs a user can trust: failures and interruptions end as failures, files are named, directories owned."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from vitq.engine.checkpoints import load_checkpoint
from vitq.engine.lifecycle import LOCK, DirectoryInUse, RunInterrupted, signals_end_the_run
from vitq.engine.run import RESULT_FILES, run

from tiny import ROOT, TINY, tiny_cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One tiny minmax run: its float cache, its checkpoint and its row."""
    tmp = tmp_path_factory.mktemp("base")
    out = tmp / "out"
    return tmp, out, run(tiny_cfg(tmp), out)


def _results(out: Path) -> set[str]:
    return {n for n in RESULT_FILES if (out / n).exists()} | {p.name for p in out.glob("*.partial")}


def test_checkpoint_with_a_nan_scale_fails_instead_of_reporting_a_result(base, tmp_path):
    _, out, _ = base
    ckpt = torch.load(out / "quantized.ckpt", weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.endswith("input_quantizer.quantizer.scale"))
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    test_out = tmp_path / "test"
    with pytest.raises(ValueError, match=rf"nan\.ckpt holds non-finite values .* {key.replace('.', '[.]')}"):
        run(tiny_cfg(base[0], "stage=test", f"quant.from_checkpoint={tmp_path / 'nan.ckpt'}"), test_out)
    assert _results(test_out) == {"FAILED"}


def test_a_failed_run_leaves_failed_and_logs_only(base, tmp_path, monkeypatch):
    """The full-scope recipe writes its checkpoint and LayerNorm ranges before points.csv and results.json:
    a failure while writing those must not leave the earlier files looking like a result."""
    import vitq.engine.run as engine

    class DiskFull(OSError):
        pass

    def fail(*args, **kwargs):
        raise DiskFull("no space left on device")

    monkeypatch.setattr(engine.csv, "DictWriter", fail)
    tmp = base[0]
    out = tmp_path / "out"
    with pytest.raises(DiskFull):
        run(tiny_cfg(tmp, "quant=fqvit", "quant.calib.num_samples=64"), out)
    assert _results(out) == {"FAILED"}
    assert (out / "FAILED").read_text().startswith("DiskFull: no space left on device")
    assert (out / "csv" / "metrics.csv").is_file()  # the logs stay
    assert not (out / LOCK).exists()


def test_a_directory_a_live_run_owns_is_refused_and_left_alone(base, tmp_path):
    tmp = base[0]
    out = tmp_path / "shared"
    out.mkdir()
    (out / "results.json").write_text('{"theirs": true}')
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(f"{holder.pid} {os.uname().nodename}\n")
        with pytest.raises(DirectoryInUse, match=rf"{out} belongs to a run that is still going \(pid {holder.pid}"):
            run(tiny_cfg(tmp), out)
        assert (out / "results.json").read_text() == '{"theirs": true}' and not (out / "FAILED").exists()
    finally:
        holder.kill()
        holder.wait()
    row = run(tiny_cfg(tmp), out)  # the holder is gone: its lock is stale, the directory is taken over
    assert json.loads((out / "results.json").read_text())["quant_top1"] == row["quant_top1"]
    assert not (out / LOCK).exists()


def test_a_damaged_float_cache_is_moved_aside_and_rebuilt(base, tmp_path, caplog):
    tmp, _, row = base
    shutil.copytree(tmp / "cache", tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("vit_mnist-mnist-*[0-9a-f].pt")
    cached.write_text("half a file")
    (outcomes,) = (tmp_path / "cache").glob("*.fp-outcomes.json")
    outcomes.write_text('{"data": ')
    again = run(tiny_cfg(tmp_path), tmp_path / "out")
    assert f"the float-model cache file={cached} cannot be read as a PyTorch checkpoint" in caplog.text
    assert "moved it to" in caplog.text and "float-metrics cache" in caplog.text
    assert (cached.parent / (cached.name + ".unreadable")).read_text() == "half a file"
    assert again["float_source"].startswith("trained here") and cached.is_file()
    assert again["fp_top1"] == row["fp_top1"]  # the same seed retrains the same model
    assert json.loads(outcomes.read_text())["data"]  # rewritten whole


def _timm_vit(**kw) -> torch.nn.Module:
    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kw})


@pytest.mark.parametrize("saved,hint", [
    ({"embed_dim": 48}, r"shape mismatch: .*\[48\] in the file vs \[32\].*\. Change the width "
                        r"\(model\.kwargs\.embed_dim / num_heads / mlp_ratio\) to match"),
    ({"num_classes": 100}, r"head\.weight \[100, 32\] in the file vs \[10, 32\].*\. Change the number of classes "
                           r"\(the task's classes, or model\.kwargs\.num_classes\) to match"),
    ({"depth": 3}, r"unexpected: blocks\.2\..*\. Change the depth \(model\.kwargs\.depth\) to match"),
    ({"patch_size": 4}, r"patch_embed\.proj\.weight \[32, 1, 4, 4\] in the file vs \[32, 1, 7, 7\].*\. Change the patch "
                        r"or image size \(model\.kwargs\.patch_size / img_size, task\.img_size\) to match"),
])
def test_a_checkpoint_that_does_not_fit_names_the_keys_and_the_setting(tmp_path, saved, hint):
    path = tmp_path / "other.pth"
    torch.save(_timm_vit(**saved).state_dict(), path)
    with pytest.raises(ValueError, match=rf"model\.checkpoint={path} does not fit the architecture VisionTransformer "
                                         rf"\(.*{hint}"):
        load_checkpoint(_timm_vit(), path)


def test_a_checkpoint_that_is_not_a_state_dict_is_named(base, tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"model\.checkpoint={text} cannot be read as a PyTorch checkpoint"):
        run(tiny_cfg(base[0], f"model.checkpoint={text}"), out)
    assert _results(out) == {"FAILED"}
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth holds list, not a state dict"):
        load_checkpoint(_timm_vit(), tmp_path / "list.pth")


def test_stage_test_is_named_after_the_checkpoint_recipe_and_run_dirs_are_unique(base):
    tmp, out, _ = base
    cfg = tiny_cfg(tmp, "quant=fqvit", "stage=test", f"quant.from_checkpoint={out / 'quantized.ckpt'}", hydra=True)
    assert cfg.run_name == "vit_mnist-mnist-minmax"  # the checkpoint's recipe, not the command line's fqvit
    run_dir = Path(cfg.hydra.run.dir)
    assert run_dir.name.startswith(time.strftime("%Y-")) and run_dir.name.rsplit("-", 1)[0].endswith("-minmax")
    assert len(run_dir.name.rsplit("-", 1)[1]) == 6  # the run's own tag


def _train(tmp: Path, *overrides: str) -> subprocess.Popen:
    args = [*TINY, f"paths.cache_dir={tmp / 'cache'}", f"paths.output_root={tmp / 'outputs'}", *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_started_together_end_in_two_complete_directories(tmp_path):
    procs = [_train(tmp_path), _train(tmp_path)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    dirs = sorted((tmp_path / "outputs").iterdir())
    assert len(dirs) == 2, dirs
    for d in dirs:
        assert {"results.json", "quantized.ckpt", "points.csv"} <= {p.name for p in d.iterdir()}
        assert not (d / "FAILED").exists() and not (d / LOCK).exists()
    rows = [json.loads((d / "results.json").read_text()) for d in dirs]
    assert rows[0]["quant_top1"] == rows[1]["quant_top1"]  # same settings, same result
    assert len(list((tmp_path / "cache").glob("*.partial"))) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_run_exits_non_zero_and_says_so(tmp_path, sig):
    proc = _train(tmp_path, "task.fit.epochs=200")  # long enough to be inside Lightning's fit loop
    deadline = time.time() + 240
    while not list((tmp_path / "outputs").glob(f"*/csv")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"vitq: run interrupted ({name}) and stopped" in err
    (out,) = (tmp_path / "outputs").iterdir()
    assert (out / "FAILED").read_text().startswith(f"interrupted ({name})")
    assert _results(out) == {"FAILED"} and not (out / LOCK).exists()

def test_an_exception_raised_while_handling_the_signal_still_reports_the_interruption():
    with pytest.raises(RunInterrupted, match=r"interrupted \(SIGINT\)") as info:
        with signals_end_the_run():
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except RunInterrupted:
                raise RuntimeError("cannot join thread before it is started")  # cleanup failing mid-handling
    assert isinstance(info.value.__cause__, RuntimeError) and info.value.exit_code == 130
    with pytest.raises(ValueError):  # without a signal, errors pass unchanged
        with signals_end_the_run():
            raise ValueError("x")
