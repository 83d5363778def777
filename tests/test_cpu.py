"""The CPU settings a training process makes (finetune/cpu.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# allocates and frees a buffer of the size given (MiB), as a training step does with its activations; prints the page
# faults of ten of them after ten to settle in (the heap takes a few rounds to hold a free block that fits)
_FAULTS = """
import resource, sys, torch
from finetune import cpu
assert cpu.keep_freed_memory()
for _ in range(10):
    torch.ones(int(sys.argv[1]) << 18)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(int(sys.argv[1]) << 18)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mib: int) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, str(mib)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_activation_sized_buffers_are_reused_and_larger_ones_given_back():
    # a 16 MiB buffer comes from the heap again each time: no page faults
    assert _faults(16) < 1_000
    # a 64 MiB one (a large model's parameter-sized temporary) is mapped afresh each time: given back when freed,
    # 16k page faults each
    assert _faults(64) > 10 * 16_000


def test_threads_share_the_cores_and_omp_num_threads_wins(monkeypatch):
    import os

    import torch

    from finetune import cpu

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert cpu.tune(processes_here=len(os.sched_getaffinity(0)) * 2) == 1
        assert cpu.tune() == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert cpu.tune() == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
