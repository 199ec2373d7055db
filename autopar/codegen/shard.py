"""Rewrite a traced graph into the graph that each tensor-parallel rank runs.

Input: the `TracedModel`'s graph (parameters lifted to placeholders) and, per
node, a `NodePlacement`: the placement of its output on the tp axis and the
placement in which it sees each of its inputs. The pass copies the graph node by
node (the traced graph is never mutated) and

1. inserts a collective wherever a producer's placement differs from what a
   consumer sees (table in docs/architecture.md), one per (producer, placement),
   shared by all consumers and placed before the first of them;
2. routes each replicated floating-point input of a node whose output is not
   replicated through `copy_to_parallel` (Megatron's f), one per producer:
   such a node's gradient for that input is one rank's summand;
3. rewrites sizes baked into view / expand / split / ... (codegen/sizes.py);
4. makes every returned value Replicate, so each rank gets the whole output.

Ops without tensor inputs (arange, zeros, full, ...) are computed whole and then
sliced by the ordinary R -> S rule, so the graph is the same on every rank: the
rank enters only at run time, through the axis the collectives resolve.

Each node's `meta["val"]` keeps the *global* value; `meta["placement"]` and
`meta["local_shape"]` say what this rank holds.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx

from autopar.capture import TracedModel
from autopar.codegen.sizes import localize_sizes
from autopar.errors import PlanError
from autopar.placement import Partial, Placement, Replicate, Shard
from autopar.runtime import collectives

PlacementOrTuple = Placement | tuple[Placement, ...]


@dataclass(frozen=True)
class NodePlacement:
    """How one node's output is laid out on the tp axis, and how it sees its inputs.

    `output` is a tuple for multi-output nodes such as `split` (their getitem
    nodes follow it); `inputs` lines up with `node.all_input_nodes`.
    """

    output: PlacementOrTuple
    inputs: tuple[Placement, ...] = ()


def shard_graph(
    traced: TracedModel,
    placements: Mapping[str, NodePlacement],
    tp_size: int,
    *,
    axis: str = "tp",
) -> fx.GraphModule:
    """The graph one rank of a `tp_size`-way tensor-parallel group runs (same on every rank).

    Nodes missing from `placements` are replicated. Collectives are calls into
    `autopar.runtime.collectives` over the mesh axis named `axis`.
    """
    source = traced.graph_module
    graph = _GraphSharder(placements, tp_size, axis).run(source.graph)
    return fx.GraphModule(source, graph)


_COLLECTIVE_NAMES = {
    collectives.all_gather: "gathered",
    collectives.all_reduce: "reduced",
    collectives.reduce_scatter: "scattered",
    collectives.shard_local: "local",
    collectives.all_to_all: "resharded",
    collectives.copy_to_parallel: "to_parallel",
}


def _register_readable_names() -> None:
    """Let fx print `all_reduce(x, 'tp')` rather than `autopar_runtime_collectives_all_reduce`."""
    register = getattr(fx.graph, "_register_custom_builtin", None)
    if register is None:
        return
    for fn in _COLLECTIVE_NAMES:
        register(fn.__name__, f"from autopar.runtime.collectives import {fn.__name__}", fn)


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
    if val.shape[dim] % (placement.groups * num_shards) != 0:
        raise PlanError(
            f"{where}: {placement} needs dimension {dim} of shape {tuple(val.shape)} to "
            f"divide by groups x tp = {placement.groups} x {num_shards}; pad it or replicate"
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


def _carries_grad(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return not _is_tensor(val) or val.dtype.is_floating_point or val.dtype.is_complex


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
    if not isinstance(placement, Shard):
        return tuple(val.shape)
    shape = list(val.shape)
    shape[placement.dim] //= num_shards
    return tuple(shape)


class _GraphSharder:
    """One pass over the source graph, building the rank-local graph node by node."""

    def __init__(self, placements: Mapping[str, NodePlacement], num_shards: int, axis: str):
        self.placements = placements
        self.num_shards = num_shards
        self.axis = axis
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}  # source node -> new node, as produced
        self.produced: dict[fx.Node, PlacementOrTuple] = {}  # source node -> actual placement
        self.converted: dict[tuple[fx.Node, Placement], fx.Node] = {}
        self.parallel_copies: dict[fx.Node, fx.Node] = {}  # new R node -> its f

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
        entry = self._entry(node)
        parallel = not _is_replicated(entry.output)
        args = {}
        for source_input, seen in zip(node.all_input_nodes, entry.inputs, strict=True):
            value = self._value_as(source_input, seen)
            if parallel and isinstance(seen, Replicate) and _carries_grad(source_input):
                value = self._copy_to_parallel(value)
            args[source_input] = value
        if not node.all_input_nodes:  # a factory: computed whole, sliced by its consumers
            self._copy(node, Replicate())
            return
        new = self._copy(node, entry.output, args)
        localize_sizes(new, entry.output, entry.inputs, self.num_shards)

    def _output(self, node: fx.Node) -> None:
        values = {u: self._value_as(u, Replicate()) for u in node.all_input_nodes}
        self.graph.node_copy(node, lambda n: values[n])

    def _value_as(self, node: fx.Node, want: Placement) -> fx.Node:
        """`node`'s value in placement `want`, inserting (or reusing) a collective."""
        have = self.produced[node]
        if have == want or isinstance(have, tuple):
            return self.env[node]
        key = (node, want)
        if key not in self.converted:
            self.converted[key] = self._convert(node, have, want)
        return self.converted[key]

    def _convert(self, node: fx.Node, have: Placement, want: Placement) -> fx.Node:
        src, axis = self.env[node], self.axis
        if isinstance(want, Replicate) and isinstance(have, Shard):
            return self._insert(collectives.all_gather, (src, have.dim, have.groups, axis), want)
        if isinstance(want, Replicate) and isinstance(have, Partial):
            return self._insert(collectives.all_reduce, (src, axis), want)
        if isinstance(want, Shard) and isinstance(have, Partial):
            args = (src, want.dim, want.groups, axis)
            return self._insert(collectives.reduce_scatter, args, want)
        if isinstance(want, Shard) and isinstance(have, Replicate):
            return self._insert(collectives.shard_local, (src, want.dim, want.groups, axis), want)
        if isinstance(want, Shard) and isinstance(have, Shard):
            if have.groups == want.groups == 1 and have.dim != want.dim:
                args = (src, have.dim, want.dim, axis)
                return self._insert(collectives.all_to_all, args, want)
            whole = self._value_as(node, Replicate())
            return self._insert(collectives.shard_local, (whole, want.dim, want.groups, axis), want)
        raise PlanError(
            f"no collective turns {node.name} from {have} into {want} (needed by a consumer); "
            "the plan's placements on this edge are inconsistent"
        )

    def _copy_to_parallel(self, value: fx.Node) -> fx.Node:
        if value not in self.parallel_copies:
            args = (value, self.axis)
            self.parallel_copies[value] = self._insert(
                collectives.copy_to_parallel, args, value.meta["placement"]
            )
        return self.parallel_copies[value]

    def _insert(self, fn, args: tuple, placement: Placement) -> fx.Node:
        source = args[0]
        base = source.args[0].name if source.target in _COLLECTIVE_NAMES else source.name
        name = f"{base}_{_COLLECTIVE_NAMES[fn]}"
        new = self.graph.create_node("call_function", fn, args, name=name)
        new.meta["val"] = source.meta.get("val")
        self._annotate(new, placement)
        return new
