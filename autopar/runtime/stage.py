"""One pipeline stage on this rank, as the schedule's `PipelineStage` runs it.

Kept apart from runtime/pipeline.py (which builds the stages and runs the schedule):
the order a stage graph takes its values in: received values in their traced memory
layout, then the user inputs it reads by keyword; runtime/feeds.py feeds the rest.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from autopar.codegen.stages import StageGraph
from autopar.ops.layout import dim_order, with_dim_order
from autopar.runtime.feeds import FedGraph


class StageModule(nn.Module):
    """One pipeline stage on this rank: `forward(*received, **user_inputs) -> tuple(sent)`.

    Feeds its stage graph (a `FedGraph`, as pp=1 feeds the whole graph) the received
    values in their traced memory layout, then the user inputs it reads (by name;
    others are ignored: the schedule gives every stage of a rank the same keyword
    arguments); `fed` supplies this rank's shards of the stage's state.
    """

    def __init__(self, stage: StageGraph, fed: FedGraph, is_last: bool):
        super().__init__()
        self.index = stage.index
        self.stage = stage
        self.graph_module = stage.graph_module
        self.fed = fed
        self.graph_reads = fed.graph_reads
        self._is_last = is_last
        placeholders = stage.graph_module.graph.find_nodes(op="placeholder")
        self._received = placeholders[: len(stage.received)]
        self._orders = [dim_order(node.meta["val"]) for node in self._received]

    def forward(self, *received: torch.Tensor, **user_inputs) -> tuple[torch.Tensor, ...]:
        inputs = [with_dim_order(x, order) for x, order in zip(received, self._orders, strict=True)]
        given = [user_inputs[input_key(name)] for name in self.stage.inputs]
        outputs = self.fed.run([*inputs, *given])
        if self._is_last:
            return tuple(outputs)
        return tuple(value.contiguous() for value in outputs)  # p2p sends whole buffers

    def received_buffers(self, device: torch.device) -> list[torch.Tensor]:
        """Empty tensors for this stage's inputs from the previous stage (contiguous)."""
        return [torch.empty(local_shape(node), dtype=node.meta["val"].dtype, device=device)
                for node in self._received]  # fmt: skip


def input_key(name: str) -> str:
    """The keyword a user input travels under (apart from the schedule's own keywords)."""
    return f"user_input_{name}"


def local_shape(node: fx.Node) -> tuple[int, ...]:
    """A stage graph value's shape on this rank (its tp shard's, where codegen set one)."""
    shape = node.meta.get("local_shape")
    return tuple(shape) if shape is not None else tuple(node.meta["val"].shape)
