"""What eager execution adds to the roofline: a fixed cost per graph node and per
optimizer call, and the gradient sums of accumulation over microbatches.

- Every call_function node of the generated code is one eager PyTorch call: dispatch,
  allocation and autograd's bookkeeping cost `device.op_overhead_s` whatever its size,
  and its backward (when a gradient flows through it) `device.backward_op_overhead_s`.
  On a CPU rank this is a few microseconds, as much as the arithmetic of a small op
  (`autopar calibrate` measures both). It does not grow with the microbatch, so the
  pipeline units keep it apart from the scaled time (solver/pipeline.py), and no
  sharding changes it (the intra-op ILP leaves it out).
- The optimizer steps each parameter tensor with `OPTIMIZER_CALLS_PER_PARAM` eager
  calls (torch.optim's AdamW: weight decay, lerp, mul, addcmul, sqrt, div, add,
  addcdiv; cost/compute.py counts their bytes), each paying the per-node overhead.
- With m microbatches a parameter's gradient is summed into `.grad` m - 1 times (the
  first backward hands its gradient over; each later one adds in place: autograd's
  AccumulateGrad), reading two values and writing one per element each time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autopar.analyze import NodeInfo
    from autopar.mesh import DeviceSpec

ACCUMULATE_TENSORS = 3  # grad += new: read both, write one
OPTIMIZER_CALLS_PER_PARAM = 8  # AdamW's eager calls per parameter tensor


def node_overhead_seconds(info: NodeInfo, device: DeviceSpec, *, training: bool) -> float:
    """The fixed cost of one call_function node: forward, plus its backward in training."""
    backward = training and info.requires_grad
    return device.op_overhead_s + (device.backward_op_overhead_s if backward else 0.0)


def accumulation_seconds(
    local_numel: float, microbatches: int, device: DeviceSpec, dtype_bytes: int
) -> float:
    """Summing the gradients of `local_numel` parameters over `microbatches` backwards."""
    nbytes = (microbatches - 1) * local_numel * ACCUMULATE_TENSORS * dtype_bytes
    return nbytes / device.memory_bandwidth


def optimizer_call_seconds(device: DeviceSpec) -> float:
    """The fixed cost of stepping one parameter tensor: its optimizer's eager calls."""
    return OPTIMIZER_CALLS_PER_PARAM * device.op_overhead_s
