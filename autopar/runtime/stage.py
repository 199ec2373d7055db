"""One pipeline stage on this rank, as the schedule's `PipelineStage` runs it.

Kept apart from runtime/pipeline.py (which builds the stages and runs the schedule):
what feeding one stage graph takes, its received values in their traced memory
layout, the user inputs it reads by keyword, its state shards, and under mixed
precision each input in the dtype it was traced with.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from autopar.codegen.stages import StageGraph
from autopar.ops import Axis, bound_axes
from autopar.ops.layout import dim_order, with_dim_order
from autopar.ops.zero import regathered_in_backward
from autopar.runtime.module import cast_inputs, compute_dtypes
from autopar.runtime.state import Slot, read_params


class StageModule(nn.Module):
    """One pipeline stage on this rank: `forward(*received, **user_inputs) -> tuple(sent)`.

    Feeds the stage graph the received values (in their traced memory layout), the
    user inputs it reads (by name; others are ignored: the schedule gives every stage
    of a rank the same keyword arguments) and this rank's shards of the stage's
    state; binds the mesh axes for its collectives (tp; dp under ZeRO-3, whose
    gathered parameters `regather` keeps out of the saved activations).
    """

    def __init__(
        self, stage: StageGraph, feeds: list[Slot], axes: dict[str, Axis], is_last: bool,
        regather: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.index = stage.index
        self.stage = stage
        self.graph_module = stage.graph_module
        self._feeds = feeds
        self._axes, self._regather = axes, regather
        self._is_last = is_last
        placeholders = stage.graph_module.graph.find_nodes(op="placeholder")
        self._received = placeholders[: len(stage.received)]
        self._orders = [dim_order(node.meta["val"]) for node in self._received]
        given_end = len(stage.received) + len(stage.inputs)
        state_nodes = placeholders[given_end:]
        self.graph_reads = read_params(feeds, state_nodes)
        self._dtypes = compute_dtypes(feeds, state_nodes)
        given = placeholders[len(stage.received) : given_end]
        self._given_dtypes = [node.meta["val"].dtype for node in given]

    def forward(self, *received: torch.Tensor, **user_inputs) -> tuple[torch.Tensor, ...]:
        inputs = [with_dim_order(x, order) for x, order in zip(received, self._orders, strict=True)]
        given = [user_inputs[input_key(name)] for name in self.stage.inputs]
        state = [feed.local() for feed in self._feeds]
        if self._dtypes is not None:  # mixed precision: the traced dtypes
            state = cast_inputs(state, self._dtypes)
            given = cast_inputs(given, self._given_dtypes)
        with bound_axes(self._axes), regathered_in_backward(self._regather):
            outputs = self.graph_module(*inputs, *given, *state)
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
