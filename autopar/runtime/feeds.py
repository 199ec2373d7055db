"""Feeding one generated graph on this rank: the one stage runtime.

A graph's placeholders take this rank's state (parameter and buffer shards, sharded
constants) and the values its caller passes (the user's inputs; in a pipeline stage
also the activations it received), in placeholder order. `FedGraph` is that call for
the whole graph of a pp=1 plan (`ParallelModule`) and for each pipeline stage
(`StageModule`) alike: it reads each slot's local tensor at call time (so a loaded or
stepped parameter is what runs), casts to the traced dtypes under mixed precision and
binds the mesh axes the graph's collectives run on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export.graph_signature import InputKind

from autopar.codegen import shard_tensor
from autopar.errors import AutoparError
from autopar.ops import Axis, bound_axes
from autopar.ops.zero import regathered_in_backward
from autopar.runtime.state import Slot, read_params


class _Given:
    def __repr__(self) -> str:
        return "<given by the caller>"


GIVEN = _Given()
"""A placeholder the caller feeds (a user input, or an activation a stage received)."""


class FedGraph:
    """`graph_module` with its placeholders fed: `run(given)` -> the graph's outputs.

    `feeds[i]` is the Slot that feeds placeholder i or `GIVEN`; `run` takes the given
    values in placeholder order. `axes` binds the graph's collectives (tp; dp under
    ZeRO-3, whose gathered parameters `regather` keeps out of the saved activations).
    """

    def __init__(
        self, graph_module: fx.GraphModule, feeds: list, axes: dict[str, Axis],
        regather: bool = False,
    ):  # fmt: skip
        placeholders = graph_module.graph.find_nodes(op="placeholder")
        if len(feeds) != len(placeholders):
            raise AutoparError(
                f"{len(feeds)} feeds for a graph of {len(placeholders)} placeholders"
            )
        self.graph_module = graph_module
        self.feeds = feeds
        self.num_given = sum(feed is GIVEN for feed in feeds)
        self.graph_reads = read_params(feeds, placeholders)  # for the dp reducer
        self._dtypes = compute_dtypes(feeds, placeholders)
        self._axes, self._regather = axes, regather

    def run(self, given: Sequence) -> tuple | list:
        if len(given) != self.num_given:
            raise AutoparError(
                f"the graph reads {self.num_given} inputs, got {len(given)}; call with the "
                "inputs the model was captured with"
            )
        values = iter(given)
        inputs = [next(values) if feed is GIVEN else feed.local() for feed in self.feeds]
        if self._dtypes is not None:  # mixed precision: the traced dtypes
            inputs = cast_inputs(inputs, self._dtypes)
        with bound_axes(self._axes), regathered_in_backward(self._regather):
            return self.graph_module(*inputs)


def placeholder_feeds(traced, nodes, model, slots, module, device=None) -> list:
    """Per placeholder node: the Slot that feeds it, a constant's Slot, or GIVEN.

    Constants are sharded by the node's placement and registered on `module.constants`
    (`module` has `tp_rank` and `tp_size`).
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    fqns = {**traced.param_fqns, **traced.buffer_fqns}
    exported = traced.exported
    constants = {
        spec.arg.name: exported.constants[spec.target]
        for spec in exported.graph_signature.input_specs
        if spec.kind == InputKind.CONSTANT_TENSOR
    }
    feeds = []
    for node in nodes:
        if node.name in fqns:
            feeds.append(slots[id(named[fqns[node.name]])])
        elif node.name in constants:
            feeds.append(_constant_feed(module, node, constants[node.name], device))
        else:
            feeds.append(GIVEN)
    return feeds


def _constant_feed(module: nn.Module, node, value: torch.Tensor, device) -> Slot:
    if not hasattr(module, "constants"):
        module.constants = nn.Module()
    placement = node.meta["placement"]
    local = shard_tensor(value, placement, module.tp_rank, module.tp_size)
    local = local.to(device) if device is not None else local
    module.constants.register_buffer(node.name, local, persistent=False)
    return Slot(node.name, module.constants, node.name, placement, value.shape, False)


def compute_dtypes(feeds: list, nodes: list) -> list | None:
    """Mixed precision: the dtype each placeholder was traced with, where a stored tensor
    that feeds one has another (fp32 master weights, a graph traced in bf16); else None.

    The cast is differentiable, so the gradient reaches the fp32 master as fp32 and
    accumulates there (over microbatches too) in fp32.
    """
    traced = [getattr(node.meta.get("val"), "dtype", None) for node in nodes]
    mixed = any(
        isinstance(feed, Slot) and dtype is not None and feed.local().dtype != dtype
        for feed, dtype in zip(feeds, traced, strict=True)
    )
    if not mixed:
        return None
    return [dtype if dtype is not None and dtype.is_floating_point else None for dtype in traced]


def cast_inputs(values: list, dtypes: list) -> list:
    """Each floating tensor in the dtype its placeholder was traced with."""
    return [
        value.to(dtype)
        if dtype is not None
        and isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != dtype
        else value
        for value, dtype in zip(values, dtypes, strict=True)
    ]
