"""How a rank times what it measures: whole windows of wall time, robust to a busy machine.

Ranks that share cores must be measured while they all run, and a single timed call
says little about that: the scheduler hands a core out in slices of milliseconds, so
a short call either runs at full speed or waits whole slices. Each measurement
instead runs a suite of calls over and over for a window of wall time, every active
rank at once, and divides the window by the suites it finished: the share of the
cores the rank really got is in the figure. Several windows are taken and the fastest
kept, since another process's load only ever adds time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU) so that a timer sees it finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def suite_seconds(
    items: Sequence[Callable[[], object]], window_s: float, windows: int, device: torch.device
) -> float:
    """Seconds one pass over `items` takes: each window's time over its passes (at least
    one), the fastest window."""
    for item in items:  # warm-up: allocator, kernels, first-call paths
        item()
    best = float("inf")
    for _ in range(windows):
        start, passes = time.perf_counter(), 0
        while passes == 0 or time.perf_counter() - start < window_s:
            for item in items:
                item()
            synchronize(device)
            passes += 1
        best = min(best, (time.perf_counter() - start) / passes)
    return best
