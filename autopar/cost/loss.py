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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx as fx

from autopar.cost.compute import is_floating
from autopar.cost.memory import tensor_bytes

if TYPE_CHECKING:
    from autopar.mesh import DeviceSpec

LOSS_FORWARD_PASSES = 2  # log_softmax: read the logits, write the log-probabilities
LOSS_BACKWARD_PASSES = 4  # nll backward writes one; log_softmax backward reads two, writes one
LOSS_NODES = 2  # log_softmax and nll_loss: each pays a node's fixed overhead


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "output")


def loss_logits(graph: fx.Graph) -> fx.Node | None:
    """The output an untraced loss reads: the graph's largest floating-point output (a
    language model's logits); None when it returns none."""
    floating = [n for n in output_node(graph).all_input_nodes if is_floating(n)]
    return max(floating, key=lambda n: n.meta["val"].numel(), default=None)


def untraced_loss_seconds(logits: fx.Node, device: DeviceSpec, dtype_bytes: int | None):
    """(forward and backward, forward alone, fixed overhead of both, of the forward) of a
    cross-entropy over `logits`, on one rank holding them whole."""
    nbytes = tensor_bytes(logits, dtype_bytes)
    forward = LOSS_FORWARD_PASSES * nbytes / device.memory_bandwidth
    backward = LOSS_BACKWARD_PASSES * nbytes / device.memory_bandwidth
    forward_overhead = LOSS_NODES * device.op_overhead_s
    overhead = forward_overhead + LOSS_NODES * device.backward_op_overhead_s
    return forward + backward, forward, overhead, forward_overhead
