"""How a rank times what it measures: CPU seconds over whole windows, robust to a busy machine.

A rank's compute is measured in the CPU seconds its process spent (on a GPU, in wall
time after a synchronize), not in wall time. Wall time on a CPU machine depends on
who else runs: the ranks of the same plan, which the cost model accounts for by its
core-sharing rule (`cost.sharing.core_share`), and every other process on the
machine, which it cannot know and which made two calibrations of a busy machine
disagree by a quarter. CPU seconds per unit of work barely move with either. Each
measurement runs a suite of calls over and over for a window of wall time, every
active rank at once (ranks on the same cores still evict each other's caches), and
divides the CPU time by the suites it finished; several windows are taken and the
fastest kept, since load only ever adds time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU) so that a timer sees it finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_clock(device: torch.device) -> Callable[[], float]:
    """The clock a rank's own work is measured by: its process's CPU seconds on a CPU
    device, wall seconds on a GPU (whose kernels the CPU only waits for)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def suite_seconds(
    items: Sequence[Callable[[], object]], window_s: float, windows: int, device: torch.device
) -> float:
    """Busy seconds (`busy_clock`) one pass over `items` takes: each window's over its
    passes (at least one per window of `window_s` wall seconds), the fastest window."""
    clock = busy_clock(device)
    for item in items:  # warm-up: allocator, kernels, first-call paths
        item()
    best = float("inf")
    for _ in range(windows):
        start, busy, passes = time.perf_counter(), clock(), 0
        while passes == 0 or time.perf_counter() - start < window_s:
            for item in items:
                item()
            synchronize(device)
            passes += 1
        best = min(best, (clock() - busy) / passes)
    return best
