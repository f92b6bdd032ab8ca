"""CPU memory-allocator tuning for training loops."""

from __future__ import annotations

import ctypes
import platform
import sys


def tune_cpu_allocator() -> bool:
    """Make glibc malloc keep freed memory for reuse; returns whether the setting was applied.

    By default glibc serves large allocations with fresh mmap()s and trims its heap as soon as a
    little of it is free, so each training step maps its activations anew and takes a page fault
    for every 4 KiB page it first touches (~150 MB a step for the 6-layer, 384-wide GPT). In a
    VM a page fault is costly: on a 2-core Zen4 VM this cost 20-30% of the step time (6-layer
    GPT in bf16: 970 -> 700 ms a step; 4-layer, 128-wide in fp32: 70 -> 57 ms). Raising the mmap
    and trim thresholds, as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ would, lets every step
    reuse the previous step's pages. The setting is process-wide and the process keeps its peak
    heap; allocations over 32 MiB (glibc's cap) are still mapped fresh.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # from <malloc.h>
    return all(
        libc.mallopt(option, value) == 1  # mallopt returns 1 on success
        for option, value in (
            (M_MMAP_THRESHOLD, 32 << 20),
            (M_TRIM_THRESHOLD, 1 << 30),
            (M_TOP_PAD, 64 << 20),
        )
    )
