"""What a strategy costs on the tensor-parallel axis: compute and optimizer time.

Kept apart from the ILP so that a plan can explain itself: the same functions price
the solver's objective and the plan's summary. Changes of placement are priced from
the reshard table (autopar/reshard.py, cost/comm.py's `reshard_seconds`).
"""

from __future__ import annotations

from autopar.cost.memory import training_memory

BACKWARD_FLOP_FACTOR = (
    2.0  # backward ~ 2x forward FLOPs (Kaplan et al. 2020, Narayanan et al. 2021)
)
# A memory-bound op's backward reads the output gradient and writes the input gradient:
# about the forward's traffic again. An add or sub hands its gradient on untouched
# (autograd runs no kernel) except to a broadcast operand, whose gradient is a sum
# that reads the output gradient once: about half the forward's traffic.
BACKWARD_BYTES_FACTOR = 1.0
PASS_THROUGH_BACKWARD_FACTOR = 0.0
BROADCAST_SUM_BACKWARD_FACTOR = 0.5
# Mixed-precision Adam touches ~32 bytes of memory per parameter per step: read and
# write fp32 master weight, momentum and variance (24 B), read the 16-bit gradient and
# write the 16-bit weight (4 B), plus slack for the gradient zeroing (4 B).
OPTIMIZER_BYTES_PER_PARAM = 32


def compute_seconds(
    flops: int, nbytes: int, splits_work: bool, mesh, tp: int, training: bool,
    backward_bytes_factor: float = BACKWARD_BYTES_FACTOR,
):  # fmt: skip
    """Roofline time of one node, forward plus backward when training."""
    device = mesh.device
    flop_factor = (1 + BACKWARD_FLOP_FACTOR) if training else 1.0
    byte_factor = (1 + backward_bytes_factor) if training else 1.0
    share = tp if splits_work else 1
    math_s = flop_factor * flops / share / (device.peak_flops * device.matmul_efficiency)
    memory_s = byte_factor * nbytes / share / device.memory_bandwidth
    return max(math_s, memory_s)


def state_bytes_per_param(training: bool, dtype_bytes: int, optimizer: str) -> float:
    """Memory one parameter holds: weight, and in training its gradient and optimizer state
    (mixed-precision Adam: the 16 bytes of the ZeRO paper), from cost/memory.py."""
    if not training:
        return dtype_bytes
    return training_memory(1, 0, dtype_bytes=dtype_bytes, optimizer=optimizer).total


def optimizer_seconds(local_numel: int, mesh) -> float:
    return local_numel * OPTIMIZER_BYTES_PER_PARAM / mesh.device.memory_bandwidth
