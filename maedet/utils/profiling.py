"""Measuring a step: wall and CPU time, peak memory (CUDA or sampled RSS), activations saved for backward."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["rss_bytes", "PeakRSS", "Meter", "SavedActivations", "median"]


def rss_bytes() -> int:
    """This process's resident set size in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the (monotonic) max RSS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median(xs: Sequence[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


class PeakRSS:
    """Samples the process RSS in a thread (every ``interval`` s); ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class Meter:
    """Runs a step function with timing and peak-memory accounting on ``device``.

    CUDA: work is synchronized before each clock read; the peak is
    ``max_memory_allocated`` (reset before the run). CPU: the peak is the sampled
    RSS (torch's large CPU buffers are mmap'ed and returned to the OS when freed,
    so each run's own peak is seen even with several models in one process).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> Tuple[float, float, float, float, Any]:
        """Returns (wall s, process CPU s, peak MB above the start, absolute peak MB, fn's result)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            torch.cuda.synchronize(self.device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = torch.cuda.max_memory_allocated(self.device)
            return wall, cpu, (peak - before) / 2**20, peak / 2**20, out
        with PeakRSS() as m:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, (m.peak - m.start) / 2**20, m.peak / 2**20, out


class SavedActivations:
    """Counts the bytes autograd saves for backward during a forward pass.

    A ``saved_tensors_hooks`` context records every tensor saved for backward (by
    built-in ops and custom autograd functions alike), deduplicated by storage;
    parameters are left out. The sum is the activation memory the backward pass
    holds on to, independent of the allocator (unlike RSS).
    """

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: Dict[int, int] = {}
        self.enabled = enabled  # off under torch.compile, whose graphs save tensors their own way

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self._params:
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        self.storages.clear()
        if self.enabled:
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._ctx.__exit__(*exc)

    @property
    def mb(self) -> Optional[float]:
        return sum(self.storages.values()) / 2**20 if self.enabled else None
