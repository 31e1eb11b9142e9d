"""Shared fixtures."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from typing import Callable

# Libraries' own caches (matplotlib's font list, wandb, yapf through mmengine) go to a directory of this
# session, removed at its end, not to the home directory: the suite leaves the machine as it found it.
# Set before anything imports those libraries; train.py runs started by tests inherit it.
_CACHES = tempfile.mkdtemp(prefix="vitq-test-caches-")
for _var in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ[_var] = os.path.join(_CACHES, _var.lower())

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: fast enough for small models, and immune to OpenMP spinning on a busy 2-core
    machine (with another process running, two spinning threads make a small forward 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A free localhost port for torch.distributed (gloo) tests."""
    def pick() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return pick


def _is_char_device(path: str) -> bool:
    return os.path.exists(path) and stat.S_ISCHR(os.stat(path).st_mode)


@pytest.fixture(scope="session", autouse=True)
def dev_null_stays_a_device():
    """Fail the run if a test replaced /dev/null (as root, renaming a file onto it succeeds)."""
    before = _is_char_device(os.devnull)
    yield
    shutil.rmtree(_CACHES, ignore_errors=True)
    if before and not _is_char_device(os.devnull):
        pytest.fail(f"{os.devnull} is no longer a character device after the test session: a test wrote over it "
                    "(restore it as root: rm -f /dev/null; mknod -m 666 /dev/null c 1 3)", pytrace=False)
