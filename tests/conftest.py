"""Shared fixtures."""
from __future__ import annotations

import socket
from typing import Callable

import pytest
import torch


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
