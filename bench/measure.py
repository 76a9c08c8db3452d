"""Timing and peak-memory measurement of one ``step()`` callable.

A step leaves nothing behind (bench/cases.py drops gradients at its end), so every call starts
from the same state: the inputs.

CPU (:func:`measure_cpu`; meant to run in a fresh process per point, see bench/point.py, which
first runs the same case at a small T so that one-time library costs are paid):

1. compiled cases (FlexAttention) get one untimed call first (compilation);
2. memory call: ``gc.collect()`` and glibc ``malloc_trim(0)`` hand freed memory back to the OS;
   ``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` makes every larger allocation its own mmap, unmapped when
   freed, so resident memory follows live memory instead of pages glibc keeps for reuse; the
   kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``); baseline = current
   RSS (it holds the inputs); one call; peak_mem_mb = VmHWM - baseline: what the op needs on top
   of its inputs (outputs, saved activations, gradients, workspace);
3. the threshold goes back to 32 MiB (glibc's dynamic maximum: smaller blocks are reused from the
   heap, as in glibc's steady state) and timed calls (``time.perf_counter``) repeat until at least
   ``min_repeats`` calls and ``min_time_s`` seconds (at most ``max_repeats``); the memory call was
   their warm-up.

GPU (:func:`measure_cuda`): a warm-up call, then one call between
``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated`` (minus the memory allocated
before it, which holds the inputs), then ``triton.testing.do_bench`` (median, p20, p80).
"""
from __future__ import annotations

import ctypes
import gc
import time

from bench.common import summarize_times

__all__ = ["measure_cpu", "measure_cuda", "rss_mb"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
_MEMORY_CALL_MMAP_THRESHOLD = 64 * 1024
_TIMING_MMAP_THRESHOLD = 32 * 1024 * 1024


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    return _status_mb("VmRSS")


def _set_mmap_threshold(libc, nbytes: int) -> None:
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)


def _release_and_reset_peak(libc) -> float:
    """Free what can be freed, reset VmHWM to the current RSS and return that RSS (MiB)."""
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb()


def peak_rss_of_call(step) -> float:
    """Peak RSS (MiB) of one step() call above the RSS just before it (see the module doc)."""
    libc = _libc()
    _set_mmap_threshold(libc, _MEMORY_CALL_MMAP_THRESHOLD)
    try:
        baseline = _release_and_reset_peak(libc)
        step()
        return _status_mb("VmHWM") - baseline
    finally:
        _set_mmap_threshold(libc, _TIMING_MMAP_THRESHOLD)
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)


def time_calls(step, *, min_repeats: int = 3, max_repeats: int = 20, min_time_s: float = 1.0) -> list:
    """Wall times (ms) of repeated step() calls: at least min_repeats and min_time_s, at most max_repeats."""
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (
            len(times) < min_repeats or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_cpu(step, *, compiled: bool = False, min_repeats: int = 3, max_repeats: int = 20,
                min_time_s: float = 1.0) -> dict:
    """median/p20/p80 ms of timed calls, peak_mem_mb of one call, and the number of timed calls."""
    if compiled:
        step()
    peak = peak_rss_of_call(step)
    times = time_calls(step, min_repeats=min_repeats, max_repeats=max_repeats, min_time_s=min_time_s)
    return {**summarize_times(times), "peak_mem_mb": peak, "repeats": len(times)}


def measure_cuda(step, device: str = "cuda") -> dict:
    """median/p20/p80 ms from triton.testing.do_bench and peak_mem_mb from max_memory_allocated."""
    import torch
    from triton.testing import do_bench

    step()  # warm-up (compilation, autotuning)
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    med, p20, p80 = do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_mem_mb": peak}
