"""Whole-file writes: the target appears only complete, and non-regular targets are refused."""
from __future__ import annotations

import os

import pytest

from vitq.files import written_atomically


def test_file_appears_only_when_the_block_completes(tmp_path):
    target = tmp_path / "out.bin"
    with written_atomically(target) as tmp:
        tmp.write_bytes(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_failed_block_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), written_atomically(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_directory_target_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="is a directory.*regular file"):
        with written_atomically(tmp_path / "d"):
            pass
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_device_target_is_refused_without_writing_beside_it():
    # /dev/null itself: refused before any temporary file is made in /dev, and the device stays a device
    before = sorted(os.listdir("/dev"))
    with pytest.raises(ValueError, match="not a regular file"):
        with written_atomically(os.devnull):
            raise AssertionError("the block must not run")
    assert sorted(os.listdir("/dev")) == before


def test_fifo_target_is_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        with written_atomically(fifo):
            pass
