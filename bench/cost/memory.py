"""Peak memory of one call: resident set on the CPU, allocated CUDA memory on a GPU.

CPU (Linux): torch's CPU tensors are ``malloc``/``posix_memalign`` allocations that ``tracemalloc``
does not see, so the process's resident set is measured instead. Before each measured call:

1. glibc's mmap threshold is pinned at 64 KiB (``mallopt(M_MMAP_THRESHOLD)``, which also turns
   off its dynamic growth), so every tensor buffer above 64 KiB is its own ``mmap`` and is returned
   to the kernel when freed; ``malloc_trim(0)`` returns what smaller frees left in the heaps.
   Memory freed by an earlier measurement therefore cannot hide the next one's allocations;
2. the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``), and the current
   RSS is read as the baseline (``VmRSS``);
3. after the call the peak (``VmHWM``) minus the baseline is the call's peak growth.

Where ``clear_refs`` cannot be written, ``ru_maxrss`` (not resettable) is used, which only sees
peaks above the process's earlier maximum: the result says which method ran.

CUDA: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() - memory_allocated()``
(the caching allocator's peak of live tensors, not what ``nvidia-smi`` shows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from collections.abc import Callable
from pathlib import Path

import torch

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
            if _libc and not hasattr(_libc, "malloc_trim"):
                _libc = False
        except OSError:
            _libc = False
        if _libc:
            _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return _libc


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release() -> None:
    gc.collect()
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def peak_cpu_bytes(fn: Callable[[], object]) -> tuple[int, str]:
    """(peak resident-set growth in bytes during ``fn()``, method name)."""
    _release()
    if _reset_peak():
        base = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        _release()
        return (peak - base) * 1024, "VmHWM-VmRSS (clear_refs)"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _release()
    return (peak - base) * 1024, "ru_maxrss delta"


def peak_cuda_bytes(fn: Callable[[], object]) -> tuple[int, str]:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    gc.collect()
    torch.cuda.empty_cache()
    return peak, "torch.cuda.max_memory_allocated"


def peak_bytes(fn: Callable[[], object], device: str) -> tuple[int, str]:
    return peak_cuda_bytes(fn) if device == "cuda" else peak_cpu_bytes(fn)
