"""Timing a module as a training job runs it: after a step of its own.

The benchmarks here interleave their contenders (every round visits each once, so that
the machine's drift falls on all of them alike). But a module's first step after
another module ran pays for the other's state (the allocator's heap and mmap threshold,
the caches): on 2 gloo ranks autopar's tp=2 took 2.14 s on its first step after another
plan and 1.46 s on the next (dp=2: 1.13 and 1.01). A training job runs one module step
after step, so every visit runs `SETTLING_STEPS` untimed steps before the timed one.
"""

from __future__ import annotations

from collections.abc import Callable

SETTLING_STEPS = 1


def settle(step: Callable[[], object]) -> None:
    """Run `step` untimed `SETTLING_STEPS` times (every rank calls it alike)."""
    for _ in range(SETTLING_STEPS):
        step()
