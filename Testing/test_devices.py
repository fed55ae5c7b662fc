"""The CPU allocator tuning: large tensors reuse heap pages instead of faulting in fresh mmap pages."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource
import torch
from AnomalyDiffusionLib.devices import tune_cpu_allocator
applied = tune_cpu_allocator()
torch.manual_seed(0)
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 16, 3, padding=1))
x = torch.randn(32, 16, 64, 64)  # the 64-channel activation is 32 MiB, like a UNet block on a slice batch
with torch.no_grad():
    net(x)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        net(x)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(malloc: str) -> dict:
    env = {**os.environ, "ANOMALY_DIFFUSION_MALLOC": malloc}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_large_tensors_stop_faulting_in_pages_once_tuned():
    pages = 4 * 32 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # four calls' fresh 32 MiB activations
    plain, tuned = _run("default"), _run("")
    assert plain["applied"] is False and tuned["applied"] is True
    assert plain["faults"] > 0.9 * pages  # glibc's default: mmap + munmap every time
    assert tuned["faults"] < 0.01 * pages  # the heap's pages are reused
