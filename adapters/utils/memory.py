"""Host memory: the peak of this process while a block runs, and handing freed memory back between phases."""

from __future__ import annotations

import ctypes
import gc
import resource
import threading
from typing import Any

MB = 2**20


def free(*objs) -> None:
    """Drop references, collect, and hand freed heap pages back to the OS so the next load does not stack."""
    del objs
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak memory of this process while the block runs (sampled every ``interval`` s), against its level at the start.

    Two figures: resident set size (RSS, what ``ru_maxrss`` and ``top`` show) and its anonymous part (RSS minus
    file-backed pages). transformers memory-maps safetensors checkpoints, so RSS also counts clean pages of a
    checkpoint that stay mapped while any tensor still points into the file; the kernel drops those under memory
    pressure without swapping. The anonymous part is the memory the process really holds.

    ``free_first``: collect and trim the heap before the start figure, so one run's leftovers do not inflate the
    next run's (the CPU stand-in for ``torch.cuda.reset_peak_memory_stats``). ``start``/``peak`` are bytes.
    """

    def __init__(self, interval: float = 0.005, free_first: bool = False):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._free_first = free_first
        self._stop = threading.Event()
        self.start = self.peak = self.start_anon = self.peak_anon = 0

    def _sample(self) -> tuple[int, int]:
        m = self._proc.memory_info()
        return m.rss, m.rss - getattr(m, "shared", 0)

    def _update(self) -> None:
        rss, anon = self._sample()
        self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self._update()

    def __enter__(self) -> PeakRSS:
        if self._free_first:
            free()
        self.start, self.start_anon = self._sample()
        self.peak, self.peak_anon = self.start, self.start_anon
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update()

    start_mb = property(lambda self: self.start / MB)
    peak_mb = property(lambda self: self.peak / MB)
    start_anon_mb = property(lambda self: self.start_anon / MB)
    peak_anon_mb = property(lambda self: self.peak_anon / MB)

    def summary(self, model_mb: float) -> dict[str, Any]:
        """The figures in MB, each rise also as a multiple of ``model_mb`` (the model's own size)."""
        rise, rise_anon = self.peak_mb - self.start_mb, self.peak_anon_mb - self.start_anon_mb

        def ratio(x: float) -> float | None:
            return round(x / model_mb, 3) if model_mb else None

        return {
            "peak_rss_mb": round(self.peak_mb, 1),
            "start_rss_mb": round(self.start_mb, 1),
            "peak_rise_mb": round(rise, 1),
            "model_mb": round(model_mb, 1),
            "peak_rise_over_model": ratio(rise),
            "peak_anon_mb": round(self.peak_anon_mb, 1),
            "start_anon_mb": round(self.start_anon_mb, 1),
            "peak_anon_rise_mb": round(rise_anon, 1),
            "peak_anon_rise_over_model": ratio(rise_anon),
            "process_ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
