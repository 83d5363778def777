"""The CPU settings a training process makes (finetune/cpu.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# allocates and frees a 64 MiB buffer, as a training step does with its activations; prints the page faults of
# ten of them after ten to settle in (tuned, the heap takes a few rounds to hold a free block that fits the aligned size)
_FAULTS = """
import resource, sys, torch
from finetune import cpu
if sys.argv[1] == "tuned":
    assert cpu.keep_freed_memory()
for _ in range(10):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_freed_buffers_are_reused_not_faulted_in_again():
    # untuned, glibc maps every 64 MiB buffer afresh: 16k page faults each (the premise: it is what costs time)
    assert _faults("default") > 10 * 16_000
    assert _faults("tuned") < 1_000


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
