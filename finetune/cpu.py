"""CPU settings a process makes before it trains or predicts: its share of the cores, and the allocator."""

from __future__ import annotations

import ctypes
import gc
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_FROM = 4 << 20  # blocks from this size are mapped when the heap has no free block for them


def tune(processes_here: int = 1) -> int:
    """Give torch this process's share of the cores (OMP_NUM_THREADS wins) and keep freed memory; returns the threads."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // processes_here))
    torch.set_num_threads(threads)
    keep_freed_memory()
    return threads


def keep_freed_memory() -> bool:
    """Keep freed blocks below 4 MiB in the heap; returns False where the C library is not glibc (macOS, musl)."""
    # glibc gives each large activation buffer back to the kernel when torch frees it, and every step faults it in
    # again, zeroed, page by page: a step runs slower (docs/benchmarks.md#allocator). jemalloc/tcmalloc via LD_PRELOAD
    # would also fix it, but need a system package; mallopt needs nothing and is the same two settings for every step.
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # blocks below 4 MiB (a small model's activations) stay in the heap, which is reused, up to 1 GiB free at its top;
    # larger ones (a 135M model's activations, parameter-sized temporaries, a chunk of logits) are mapped when no free
    # block fits and given back when freed: kept in the heap, the holes they left between smaller blocks raised peaks
    # by up to a quarter, by chance from one run to the next (docs/benchmarks.md#allocator)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_FROM)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def release_freed_memory() -> None:
    """Collect what is no longer referenced (cycles too) and give the heap's free pages back to the kernel: the heap
    keeps freed memory (keep_freed_memory), so a large object's memory would otherwise stay resident beside the next."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Give the heap's free pages back to the kernel (glibc's malloc_trim; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class StepHeap:
    """Gives the heap's free pages back before a training step at least RISE times the size of the step before it.

    Length-grouped batches shrink through a group (finetune/training_order.py): the short steps' blocks, and what
    outlives a step, land in the holes the group's longest step left and split them, so the next group's first step
    no longer fits them and the heap grows beside holes that stay resident (docs/memory.md#allocator). A step only a
    little larger than the one before fits what the larger steps before it left, and a trim would only make the pages
    it takes again fault in (docs/benchmarks.md#allocator)."""

    RISE = 2

    def __init__(self):
        self.previous = 0

    def before(self, size: int) -> bool:
        """Called with each step's size (its largest micro-batch's tokens) before it runs; True when it trimmed."""
        rose = 0 < self.previous * self.RISE <= size
        self.previous = size
        if rose:
            trim_heap()
        return rose
