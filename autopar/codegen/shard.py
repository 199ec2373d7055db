"""Rewrite a traced graph into the graph that each tensor-parallel rank runs.

Input: the `TracedModel`'s graph (parameters lifted to placeholders) and, per
node, a `NodePlacement`: the placement of its output on the tp axis and the
placement in which it sees each of its inputs. The pass copies the graph node by
node (the traced graph is never mutated) and

1. inserts a `redistribute` call wherever the reshard table (autopar/reshard.py)
   has steps for an edge: the producer's placement, what the consumer sees, and
   the placement of the gradient the consumer hands back (a replicated input of a
   node doing its rank's part of the work gets a partial one: Megatron's f). One
   call per (producer, placement seen, gradient), shared by all its consumers;
2. rewrites sizes baked into view / expand / split / ... (codegen/sizes.py), and
   lowers the vocabulary-parallel embedding and cross-entropy and the mean over a
   sharded dim (codegen/lowering.py);
3. makes every returned value Replicate, so each rank gets the whole output.

Ops without tensor inputs (arange, zeros, full, ...) are computed whole and then
sliced by the ordinary R -> S rule, so the graph is the same on every rank: the
rank enters only at run time, through the axis the collectives resolve.

Each node's `meta["val"]` keeps the *global* value; `meta["placement"]` and
`meta["local_shape"]` say what this rank holds.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
import torch.fx as fx

from autopar import ops
from autopar.capture import TracedModel
from autopar.codegen.lowering import LOWERED, lower
from autopar.codegen.sizes import localize_sizes
from autopar.errors import PlanError
from autopar.ops.zero import gather_params
from autopar.placement import (
    NodePlacement,
    Placement,
    PlacementOrTuple,
    Replicate,
    Shard,
    is_padded,
    local_shape,
)
from autopar.reshard import defers_to_step, input_gradient, reshard, sole_parameter


def shard_graph(
    traced: TracedModel,
    placements: Mapping[str, NodePlacement],
    tp_size: int,
    *,
    axis: str = "tp",
) -> fx.GraphModule:
    """The graph one rank of a `tp_size`-way tensor-parallel group runs (same on every rank).

    Nodes missing from `placements` are replicated. Collectives are calls to
    `autopar.ops.redistribute` over the mesh axis named `axis`. Megatron's f on a
    value whose gradient goes to one parameter alone is left out (`reshard.defers_to_step`,
    a parameter read by one node or made into the value by a replicated chain): the module's
    `meta["partial_grads"]` lists those parameter placeholders, whose gradients are
    partial sums over `axis` until the runtime sums them once per step.
    """
    source = traced.graph_module
    sharder = _GraphSharder(traced, placements, tp_size, axis)
    module = fx.GraphModule(source, sharder.run(source.graph))
    module.meta["partial_grads"] = sharder.partial_grads
    return module


def _register_readable_names() -> None:
    """Let fx print `redistribute(x, 'tp', ...)` rather than `autopar_ops_..._redistribute`."""
    register = getattr(fx.graph, "_register_custom_builtin", None)
    if register is None:
        return
    register("redistribute", "from autopar.ops import redistribute", ops.redistribute)
    register("recomputed", "from autopar.ops import recomputed", ops.recomputed)
    register("gather_params", "from autopar.ops.zero import gather_params", gather_params)
    for fn in LOWERED:
        register(fn.__name__, f"from autopar.ops.vocab import {fn.__name__}", fn)


_register_readable_names()


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _normalize(placement: Placement, val, where: str, num_shards: int) -> Placement:
    """Shard dims made non-negative and checked against the tensor's shape."""
    if not isinstance(placement, Shard) or not _is_tensor(val):
        return placement
    if not -val.dim() <= placement.dim < val.dim():
        raise PlanError(f"{where}: {placement} on a {val.dim()}-d tensor")
    dim = placement.dim % val.dim()
    if placement.groups > 1 and val.shape[dim] % (placement.groups * num_shards) != 0:
        raise PlanError(
            f"{where}: {placement} needs dimension {dim} of shape {tuple(val.shape)} to "
            f"divide by groups x tp = {placement.groups} x {num_shards} (only an ungrouped "
            "shard pads); replicate it or plan again"
        )
    return Shard(dim, placement.groups)


def _normalize_output(output: PlacementOrTuple, val, where: str, num_shards: int):
    if isinstance(output, tuple):
        vals = val if isinstance(val, list | tuple) else [None] * len(output)
        return tuple(_normalize(p, v, where, num_shards) for p, v in zip(output, vals, strict=True))
    return _normalize(output, val, where, num_shards)


def _is_replicated(placement: PlacementOrTuple) -> bool:
    if isinstance(placement, tuple):
        return all(isinstance(p, Replicate) for p in placement)
    return isinstance(placement, Replicate)


def _is_element_of_tuple(node: fx.Node) -> bool:
    """A getitem that picks one output of a multi-output node (split, ...)."""
    if node.target is not operator.getitem:
        return False
    return isinstance(node.args[0].meta.get("val"), list | tuple)


def _local_shape(val, placement: PlacementOrTuple, num_shards: int):
    if isinstance(placement, tuple) and isinstance(val, list | tuple):
        return tuple(_local_shape(v, p, num_shards) for v, p in zip(val, placement, strict=True))
    if not _is_tensor(val) or isinstance(placement, tuple):
        return None
    return local_shape(tuple(val.shape), placement, num_shards)


class _GraphSharder:
    """One pass over the source graph, building the rank-local graph node by node."""

    def __init__(self, traced, placements: Mapping[str, NodePlacement], num_shards: int, axis):
        self.analysis = traced.analysis
        self.placements = placements
        self.num_shards = num_shards
        self.axis = axis
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}  # source node -> new node, as produced
        self.produced: dict[fx.Node, PlacementOrTuple] = {}  # source node -> actual placement
        self.converted: dict[tuple, fx.Node] = {}  # (source node, seen, gradient) -> reshard
        self.param_names = set(traced.param_fqns)
        self.partial_grads: list[str] = []  # parameters whose gradient sum waits for the step

    def run(self, source: fx.Graph) -> fx.Graph:
        for node in source.nodes:
            try:
                if node.op == "output":
                    self._output(node)
                elif node.op == "call_function":
                    self._call(node)
                else:
                    self._copy(node, self._entry(node).output)
            except PlanError:
                raise
            except Exception as error:
                error.add_note(f"while sharding {node.format_node()}")
                raise
        self.graph.lint()
        return self.graph

    def _entry(self, node: fx.Node) -> NodePlacement:
        """The node's placements, defaulted to replicated and normalized."""
        inputs = node.all_input_nodes
        entry = self.placements.get(node.name)
        if entry is None:
            return NodePlacement(Replicate(), tuple(Replicate() for _ in inputs))
        if len(entry.inputs) != len(inputs):
            raise PlanError(
                f"placement of {node.name} lists {len(entry.inputs)} inputs but the node has "
                f"{len(inputs)} ({[n.name for n in inputs]}): {node.format_node()}"
            )
        where = f"node {node.name}"
        seen = tuple(
            _normalize(p, u.meta.get("val"), f"{where} input {u.name}", self.num_shards)
            for p, u in zip(entry.inputs, inputs, strict=True)
        )
        output = _normalize_output(entry.output, node.meta.get("val"), where, self.num_shards)
        return NodePlacement(output, seen)

    def _copy(self, node: fx.Node, produced: PlacementOrTuple, args=None) -> fx.Node:
        new = self.graph.node_copy(node, lambda n: (args or self.env)[n])
        self.env[node] = new
        self.produced[node] = produced
        self._annotate(new, produced)
        return new

    def _annotate(self, new: fx.Node, placement: PlacementOrTuple) -> None:
        new.meta["placement"] = placement
        new.meta["local_shape"] = _local_shape(new.meta.get("val"), placement, self.num_shards)

    def _call(self, node: fx.Node) -> None:
        if _is_element_of_tuple(node):
            producer, index = node.args
            whole = self.produced[producer]
            element = whole[index] if isinstance(whole, tuple) else whole
            where = f"node {node.name}"
            self._copy(node, _normalize(element, node.meta.get("val"), where, self.num_shards))
            return
        if not node.all_input_nodes:  # a factory: computed whole, sliced by its consumers
            self._copy(node, Replicate())
            return
        entry = self._entry(node)
        replicated = _is_replicated(entry.output)
        args = {
            source: self._value_as(source, seen, input_gradient(seen, replicated))
            for source, seen in zip(node.all_input_nodes, entry.inputs, strict=True)
        }
        new = self._copy(node, entry.output, args)
        localize_sizes(new, entry.output, entry.inputs, self.num_shards)
        lowered = lower(new, entry, self.axis, node)
        if lowered is not new:
            self.env[node] = lowered
            self._annotate(lowered, entry.output)

    def _output(self, node: fx.Node) -> None:
        # every rank returns the whole output, and the loss on it hands back a whole gradient
        values = {u: self._value_as(u, Replicate(), Replicate()) for u in node.all_input_nodes}
        self.graph.node_copy(node, lambda n: values[n])

    def _value_as(self, node: fx.Node, want: Placement, grad: Placement) -> fx.Node:
        """`node`'s value as `want` with its gradient coming back as `grad`: the table's
        entry, inserted once per (node, want, grad) and shared by every consumer."""
        have = self.produced[node]
        if isinstance(have, tuple):
            return self.env[node]
        grad = grad if self.analysis.nodes[node.name].requires_grad else None
        key = (node, want, grad)
        parameter = None if key in self.converted else self._deferred(node, have, want, grad)
        if parameter is not None:
            self.partial_grads.append(parameter)
            self.converted[key] = self.env[node]
        if key not in self.converted:
            new = reshard_node(
                self.graph, self.env[node], self.axis, have, want, grad, self.num_shards
            )
            if new is not self.env[node]:
                self._annotate(new, want)
            self.converted[key] = new
        return self.converted[key]

    def _deferred(self, node: fx.Node, have, want, grad) -> str | None:
        """The parameter whose gradient sum this entry leaves to the step, if it does: the
        chain making `node` from it must be replicated, so every rank's partial gradient
        is a summand of the same whole one."""
        entry, found = reshard(have, want, grad), sole_parameter(node, self.param_names)
        if entry is None or found is None or not defers_to_step(entry, found[0]):
            return None
        parameter, chain = found
        made = [self.produced[n] for n in (parameter, *chain)]
        seen = [p for n in chain for p in self._entry(n).inputs]
        return parameter.name if all(_is_replicated(p) for p in (*made, *seen)) else None


def reshard_node(graph, value: fx.Node, axis: str, have, want, grad, num_shards=None) -> fx.Node:
    """A `redistribute` call turning `value` from `have` into `want` on `axis`, its gradient
    coming back as `grad` (None: no gradient), appended to `graph`; `value` itself when the
    table's entry is empty. PlanError when the table has no entry. The call carries the
    global shape where one of the shards pads (a dim that does not divide `num_shards`)."""
    entry = reshard(have, want, grad)
    if entry is None:
        raise PlanError(
            f"no collective turns {value.name} from {have} into {want} (gradient {grad}), "
            "as a consumer needs; the plan's placements on this edge are inconsistent"
        )
    if entry.is_identity:
        return value
    kinds = [step.kind for step in entry.forward] or ["to_parallel"]
    grad_text = None if grad is None else str(grad)
    args = (value, axis, str(have), str(want), grad_text)
    shape = tuple(value.meta["val"].shape) if _is_tensor(value.meta.get("val")) else None
    if shape and num_shards and any(is_padded(shape, p, num_shards) for p in (have, want, grad)):
        args += (list(shape),)
    name = f"{value.name}_{'_'.join(kinds)}"
    new = graph.create_node("call_function", ops.redistribute, args, name=name)
    new.meta["val"] = value.meta.get("val")
    new.meta["reshard"] = entry
    return new
