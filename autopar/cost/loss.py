"""The loss a user computes outside the traced graph, priced as a softmax cross-entropy
over the model's output.

`train_step(inputs, target, loss_fn)` runs `loss_fn` on the last stage's output, outside
the graph autopar traced (`capture(..., loss_fn=...)` traces it instead, and then its
nodes are priced as any other). A language model's loss is a cross-entropy over its
logits, batch x sequence x vocabulary: the largest tensor of the step. Eager PyTorch
runs it as `log_softmax` (reads the logits, writes their log-probabilities) and
`nll_loss` (one value per row); its backward as `nll_loss_backward` (writes the
log-probabilities' gradient, zero but one value per row) and `_log_softmax_backward_data`
(reads that gradient and the log-probabilities, writes the logits' gradient). Over the
logits that is 2 passes forward and 4 backward, each memory-bound (torch's
aten/src/ATen/native/LossNLL.cpp and SoftMax.cpp; the exponentials are as cheap per
byte as the softmax in `autopar calibrate`'s bandwidth suite). Every rank that holds
the whole output (every tp rank: the graph's output is replicated) runs it.

Those passes on the roofline are the GPU presets' price. On CPU ranks `autopar
calibrate` measures the loss itself (`DeviceSpec.loss_seconds_per_byte`, a next-token
cross-entropy at a few logits sizes), because there its cost per byte grows with the
logits: on a 2-core VM 0.6-1.0 ms per MiB up to 16 MiB and 1.9-2.8 at 64 MiB, against
0.5 on the roofline, as blocks that large come back from the OS as fresh pages. The
price interpolates the measured cost per byte in log size and holds the end points
beyond the sizes measured.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING

import torch.fx as fx

from autopar.cost.compute import is_floating

if TYPE_CHECKING:
    from autopar.mesh import DeviceSpec

LOSS_FORWARD_PASSES = 2  # log_softmax: read the logits, write the log-probabilities
LOSS_BACKWARD_PASSES = 4  # nll backward writes one; log_softmax backward reads two, writes one
LOSS_NODES = 2  # log_softmax and nll_loss: each pays a node's fixed overhead
LOSS_PASSES = LOSS_FORWARD_PASSES + LOSS_BACKWARD_PASSES


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "output")


def loss_logits(graph: fx.Graph) -> fx.Node | None:
    """The output an untraced loss reads: the graph's largest floating-point output (a
    language model's logits); None when it returns none."""
    floating = [n for n in output_node(graph).all_input_nodes if is_floating(n)]
    return max(floating, key=lambda n: n.meta["val"].numel(), default=None)


def untraced_loss_seconds(nbytes: float, device: DeviceSpec):
    """(forward and backward, forward alone, fixed overhead of both, of the forward) of a
    cross-entropy over `nbytes` of logits, on one rank holding them whole."""
    both = loss_seconds(nbytes, device)
    forward_overhead = LOSS_NODES * device.op_overhead_s
    overhead = forward_overhead + LOSS_NODES * device.backward_op_overhead_s
    return both, both * LOSS_FORWARD_PASSES / LOSS_PASSES, overhead, forward_overhead


def loss_seconds(nbytes: float, device: DeviceSpec) -> float:
    """Forward and backward of a cross-entropy over `nbytes` of logits, fixed overheads
    apart: what calibration measured at that size, else the passes on the roofline."""
    if device.loss_seconds_per_byte:
        return nbytes * measured_seconds_per_byte(device.loss_seconds_per_byte, nbytes)
    return LOSS_PASSES * nbytes / device.memory_bandwidth


def measured_seconds_per_byte(curve: tuple[tuple[float, float], ...], nbytes: float) -> float:
    """The calibrated cost per byte at `nbytes` of logits: linear in log size between the
    sizes measured (sorted), the nearest end's beyond them."""
    sizes = [size for size, _ in curve]
    if nbytes <= sizes[0]:
        return curve[0][1]
    if nbytes >= sizes[-1]:
        return curve[-1][1]
    above = bisect.bisect_right(sizes, nbytes)
    (low, low_s), (high, high_s) = curve[above - 1], curve[above]
    weight = math.log(nbytes / low) / math.log(high / low)
    return low_s + weight * (high_s - low_s)
