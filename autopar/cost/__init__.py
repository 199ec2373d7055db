"""Analytic cost model: collective time, roofline compute time, training memory."""

from autopar.cost.comm import COLLECTIVE_KINDS, collective_time
from autopar.cost.compute import compute_time, training_compute_time
from autopar.cost.memory import MemoryBreakdown, training_memory

__all__ = [
    "COLLECTIVE_KINDS",
    "MemoryBreakdown",
    "collective_time",
    "compute_time",
    "training_compute_time",
    "training_memory",
]
