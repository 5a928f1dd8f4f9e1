"""Timing and peak-memory measurement for one callable, on CPU or CUDA.

Time: median over repeats (perf_counter on CPU after a warm-up call; triton.testing.do_bench on
CUDA when triton imports, else CUDA events).

Peak memory, extra over what was allocated before the call:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
- CPU (Linux): the process's peak resident set (VmHWM), reset through /proc/self/clear_refs
  just before the call. glibc keeps freed blocks below its (adaptive) mmap threshold in the heap,
  which would hide a temporary's pages from the next measurement; ``prepare_cpu_memory_probe``
  pins the threshold low so every large temporary is mapped and unmapped on its own.
  Run all timings before the first memory probe: the pinned threshold slows allocation.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import torch

_MIB = 2.0**20


def time_ms(fn: Callable[[], object], device: str, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if device == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            return _time_cuda_events(fn, repeats)
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _time_cuda_events(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(repeats, 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def prepare_cpu_memory_probe() -> bool:
    """Pin glibc's mmap threshold at 64 KiB (see module docstring). False where unsupported."""
    libc = _libc()
    if libc is None:
        return False
    m_mmap_threshold, m_trim_threshold = -3, -1
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 0))


def _release_free_heap() -> None:
    # Blocks freed before the threshold was pinned sit resident in the heap; malloc serves new
    # requests from them before it maps fresh pages, which would hide them from the peak.
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_extra_mib(fn: Callable[[], object], device: str) -> float | None:
    """Extra peak memory of one ``fn()`` call in MiB, or None where it cannot be measured."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / _MIB
    _release_free_heap()
    try:
        before = _read_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        result = fn()
        peak = _read_status_kib("VmHWM")
        del result
    except OSError:
        return None
    return max(peak - before, 0) * 1024 / _MIB
