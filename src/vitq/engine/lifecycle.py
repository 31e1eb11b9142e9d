"""A run's hold on its directory and its reaction to signals.

A directory belongs to one live run at a time (a lock file holding its pid, host and SLURM job), and
SIGTERM / SIGINT end a run as a failure: Lightning would otherwise stop its loops early and let the run
finish "successfully" on part of the data, exiting 0. SIGUSR2 is submitit's warning before a time limit
or a preemption: the handler submitit installed runs first (on rank 0 it pickles the job and requeues
it), then the run ends as preempted, to resume in the same directory when the job starts again.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Iterator

LOCK = ".vitq-run.lock"
PREEMPT_SIGNAL = signal.SIGUSR2  # submitit's default (SUBMITIT_PREEMPT_SIGNAL), `--signal=USR2@signal_delay_s`


def slurm_job() -> str:
    """This SLURM job (`<job id>_<array index>`), the same for every attempt of a requeued job; '-' outside
    SLURM."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if job else "-"


class RunInterrupted(BaseException):
    """The run received SIGTERM or SIGINT (a BaseException, like KeyboardInterrupt: no `except Exception`
    on the way up may swallow it)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.signame = signal.Signals(signum).name
        super().__init__(f"interrupted ({self.signame})")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal

    @property
    def preempted(self) -> bool:
        """Ended by the scheduler's warning (submitit's USR2): a requeue resumes it."""
        return self.signum == PREEMPT_SIGNAL


class DirectoryInUse(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def acquire(out_dir: Path) -> Path:
    """Claim `out_dir` for this process; refuse one a live run on this host holds, take over a stale one
    (its holder is gone from this host, or it was an earlier attempt of this SLURM job: a requeue after a
    SIGKILL, on whatever node)."""
    lock = out_dir / LOCK
    me = f"{os.getpid()} {socket.gethostname()} {slurm_job()}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, host, job = _holder(lock)
            same_job = job != "-" and job == slurm_job() and pid != os.getpid()
            if pid is not None and not same_job and (host != socket.gethostname() or _alive(pid)):
                raise DirectoryInUse(
                    f"{out_dir} belongs to a run that is still going (pid {pid} on {host}); a run never writes "
                    "into another run's directory: leave hydra.run.dir at its default (unique per run) or pick "
                    "a new one") from None
            lock.unlink(missing_ok=True)  # the holder is gone: its lock is stale
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return lock
    raise DirectoryInUse(f"could not claim {out_dir}: another run claimed it at the same moment")


def _holder(lock: Path) -> tuple[int | None, str, str]:
    """(pid, host, SLURM job) of a lock; a lock written before the job was recorded has job '-'."""
    try:
        pid, host, *job = lock.read_text().split()
        return int(pid), host, (job or ["-"])[0]
    except (OSError, ValueError):
        return None, "", "-"


def release(lock: Path) -> None:
    if _holder(lock)[0] == os.getpid():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def signals_end_the_run() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGUSR2 raise RunInterrupted in the main thread for the duration (Lightning keeps
    handlers that were installed before its own and calls them after its notifier). The SIGUSR2 handler
    that was there (submitit's checkpoint-and-requeue) runs first; whatever it raises (SystemExit after
    requeueing, `UncompletedJobError` when the job may not be requeued) becomes the cause."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        global _received
        _received = signum
        previous = before.get(signum)
        if signum == PREEMPT_SIGNAL and callable(previous):
            try:
                previous(signum, frame)  # submitit: requeue (rank 0), or only log (other ranks)
            except BaseException as e:  # noqa: BLE001 (SystemExit after a requeue, UncompletedJobError)
                raise RunInterrupted(signum) from e
        raise RunInterrupted(signum)

    global _received
    _received = None
    before: dict = {}
    for s in (signal.SIGTERM, signal.SIGINT, PREEMPT_SIGNAL):
        before[s] = signal.signal(s, interrupt)
    try:
        yield
    except BaseException as e:
        # the interruption may surface as another exception (a progress-bar thread torn down mid-start
        # while Lightning handles it): the run still ended because of the signal
        if _received is not None and not isinstance(e, RunInterrupted):
            raise RunInterrupted(_received) from e
        raise
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


_received: int | None = None  # the signal that interrupted the current run, if any
