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
    holds none of them afterwards. (Without it glibc keeps them in its heap in some runs and not in others,
    depending on where the small blocks land, so only the setting's side is asserted.)"""
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
    held = int(subprocess.run([sys.executable, "-c", code, "on"], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    assert held < 64, held  # MiB still resident after 3 x 640 MiB were freed: measured 1
