"""The allocator setting the engine applies at start-up."""
from __future__ import annotations

import platform
import subprocess
import sys

from vitq.memory import return_freed_memory


def test_return_freed_memory_is_applied_on_glibc():
    assert return_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_freed_blocks_go_back_to_the_os():
    """With the setting, a process that allocated and freed 40 blocks of 16 MiB amid small live tensors
    holds far less than it did at its peak; without it, glibc keeps the blocks in its heap."""
    code = """
import sys, torch
from vitq.memory import return_freed_memory
if sys.argv[1] == "on":
    return_freed_memory()
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
keep = []
start = rss()
for _ in range(3):
    blocks = [torch.ones(4 << 20) for _ in range(40)]  # 40 x 16 MiB
    keep += [torch.ones(8) for _ in range(40)]           # small live tensors allocated after them
    del blocks
print(rss() - start)
"""
    if platform.libc_ver()[0] != "glibc":
        return
    held = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for mode in ("on", "off")}
    # MiB still resident after the blocks were freed: measured 1 with the setting, 769 without
    assert held["on"] < 64 and held["off"] > 400, held
