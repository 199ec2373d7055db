"""Analytic cost model: collective time, roofline compute time, training memory.

`cost.pricing` is the API the solver, the stage DP and the summary read: a node's
compute, memory and optimizer cost under a strategy, an edge's reshard, and a whole
chosen sharding priced item by item.
"""

from autopar.cost.comm import COLLECTIVE_KINDS, collective_time
from autopar.cost.compute import compute_time, training_time
from autopar.cost.memory import MemoryBreakdown, training_memory

__all__ = [
    "COLLECTIVE_KINDS",
    "MemoryBreakdown",
    "collective_time",
    "compute_time",
    "training_time",
    "training_memory",
]
