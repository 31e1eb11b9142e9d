"""A run's hold on its directory and its reaction to signals.

A directory belongs to one live run at a time (a lock file holding its pid), and SIGTERM / SIGINT end a
run as a failure: Lightning would otherwise stop its loops early and let the run finish "successfully"
on part of the data, exiting 0.
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
    """Claim `out_dir` for this process; refuse one a live run on this host holds, take over a stale one."""
    lock = out_dir / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, host = _holder(lock)
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
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


def _holder(lock: Path) -> tuple[int | None, str]:
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def release(lock: Path) -> None:
    if _holder(lock)[0] == os.getpid():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def signals_end_the_run() -> Iterator[None]:
    """SIGTERM and SIGINT raise RunInterrupted in the main thread for the duration (Lightning keeps
    handlers that were installed before its own and calls them after its notifier)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        global _received
        _received = signum
        raise RunInterrupted(signum)

    global _received
    _received = None
    before = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
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
