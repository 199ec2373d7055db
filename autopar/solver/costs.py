"""What a strategy and a change of placement cost on the tensor-parallel axis.

Kept apart from the ILP so that a plan can explain itself: the same functions price
the solver's objective and the collectives listed in a plan's summary.

Training prices forward and backward together. A change of placement on an edge
follows the table in docs/architecture.md; its backward is the mirror collective
when the tensor carries a gradient. Megatron's `f` (identity forward, all-reduce
backward) is priced separately, once per producer, in the solver.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.cost.memory import training_memory
from autopar.placement import Partial, Placement, Replicate, Shard

FORWARD, BACKWARD = "forward", "backward"
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


@dataclass(frozen=True)
class CommOp:
    """One collective on the tp axis: its kind, when it runs, and the full tensor size."""

    kind: str
    phase: str
    nbytes: int


def reshard_ops(src: Placement, dst: Placement, nbytes: int, carries_grad: bool):
    """Collectives turning `src` into `dst` (forward and, with a gradient, backward).

    Returns None when no collective can do it (nothing becomes Partial).
    """
    if src == dst:
        return ()
    backward = carries_grad
    if isinstance(dst, Partial):
        return None
    if isinstance(src, Replicate):  # dst is a Shard: slice locally, gather the gradient
        return (CommOp("all_gather", BACKWARD, nbytes),) if backward else ()
    if isinstance(src, Partial):
        if isinstance(dst, Replicate):
            return (CommOp("all_reduce", FORWARD, nbytes),)
        ops = (CommOp("reduce_scatter", FORWARD, nbytes),)
        return ops + ((CommOp("all_gather", BACKWARD, nbytes),) if backward else ())
    if isinstance(dst, Replicate):
        return (CommOp("all_gather", FORWARD, nbytes),)
    assert isinstance(src, Shard) and isinstance(dst, Shard)
    if src.dim == dst.dim or src.groups != 1 or dst.groups != 1:
        return None  # regrouping one dim is not generated
    ops = (CommOp("all_to_all", FORWARD, nbytes),)
    return ops + ((CommOp("all_to_all", BACKWARD, nbytes),) if backward else ())


def comm_seconds(ops, mesh, tp: int) -> float:
    return sum(mesh.tp_collective_time(op.kind, op.nbytes, tp) for op in ops)


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
