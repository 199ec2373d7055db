"""How a rank times what it measures: round-robin windows, robust to a busy machine.

Ranks that share cores must be measured while they all run, so a single timed call
says little (the scheduler hands a core out in slices of milliseconds). Each
measurement instead cycles through its items for a fixed window of wall time, every
active rank at once, and keeps each item's median call; several windows are taken
and the fastest kept, since another process's load only ever adds time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU) so that a timer sees it finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def item_seconds(
    items: Sequence[Callable[[], object]], window_s: float, windows: int, device: torch.device
) -> list[float]:
    """Seconds per call of each item: the median call within a window, the fastest window."""
    for item in items:  # warm-up: allocator, kernels, first-call paths
        item()
    best = [float("inf")] * len(items)
    for _ in range(windows):
        calls: list[list[float]] = [[] for _ in items]
        end = time.perf_counter() + window_s
        while time.perf_counter() < end or not all(calls):
            for i, item in enumerate(items):
                start = time.perf_counter()
                item()
                synchronize(device)
                calls[i].append(time.perf_counter() - start)
        best = [min(b, statistics.median(c)) for b, c in zip(best, calls, strict=True)]
    return best
