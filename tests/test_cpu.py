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


# a length group's steps (n blocks a step, as activations, and one block that outlives it), shrinking, then the next
# group's first step: prints how far it raised the peak resident memory (MiB), with the engines' StepHeap or without
_GROUP = r"""
import sys, torch
from finetune import cpu, memory
assert cpu.keep_freed_memory()
heap, kept = cpu.StepHeap(), []
peak = memory.rss_peak_mb  # this process's own high-water mark, not its parent's
def step(kib, n=48):
    if sys.argv[1] == "trim":
        heap.before(kib * n)
    blocks = [torch.ones(kib << 8) for _ in range(n)]
    kept.append(torch.ones(1 << 10))
for kib in [3968 - 70 * k for k in range(41)]:
    step(kib)
before = peak()
step(3840)
print(round(peak() - before))
"""


def _faults(mib: int) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, str(mib)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_activation_sized_buffers_are_reused_and_larger_ones_given_back():
    # a 3 MiB buffer comes from the heap again each time: no page faults
    assert _faults(3) < 1_000
    # a 16 MiB one (a larger model's activation block) is mapped afresh each time: given back when freed, 4k page
    # faults each
    assert _faults(16) > 10 * 4_000


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


def test_the_heap_is_trimmed_before_a_step_twice_the_size_of_the_one_before(monkeypatch):
    from finetune import cpu

    trims = []
    monkeypatch.setattr(cpu, "trim_heap", lambda: trims.append(True))
    heap = cpu.StepHeap()
    # a length group shrinks and the next begins (10 times the last step); smaller rises, as in random order, do not trim
    sizes = [640, 320, 70, 60, 600, 500, 900, 1000]
    assert [heap.before(n) for n in sizes] == [False, False, False, False, True, False, False, False]
    assert len(trims) == 1


@pytest.mark.slow
def test_the_next_length_groups_first_step_does_not_grow_the_heap():
    def growth(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _GROUP, how], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    # without the trim many of its 3.75 MiB blocks fit none of the holes the shrinking steps' blocks split, and are
    # taken beside the resident holes (80-83 of its 180 MiB in five runs); trimmed first, they are taken where the
    # holes' pages were given back
    assert growth("keep") > 30
    assert growth("trim") < 10
