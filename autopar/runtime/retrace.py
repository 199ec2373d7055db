"""Apply a plan made on one trace of a model to its trace at another batch size.

The runtime traces the model at the plan's microbatch size (graphs have static
shapes). Node names are stable ids (module path, op, ordinal: autopar/normalize.py),
so the two graphs name the same computations alike and the plan is looked up by name.
The one difference torch.export makes is to leave out view-like ops that do nothing
at a shape (`normalize.MAY_VANISH`; at batch 1, `expand(mask, [1, -1, T, T])` of a
`(1, 1, T, T)` mask). Such an op keeps its placement's shape where it does nothing,
so inputs are matched modulo view chains (as `normalize.view_root` does), and a node the plan
lacks, which must be such an op, passes its input's placement through.

The same holds for dtype casts when the runtime graph is traced in bf16 for a plan
made in fp32 (mixed precision): a cast to fp32 that does nothing in fp32 aliases its
input there and copies in bf16, so a reader may see the cast in one graph and its
input in the other; inputs are matched modulo casts too (a cast keeps placements).

A grouped shard of a dim merged from batch rows and heads (Bloom's scores,
`Shard(0, groups=batch)`) has one block per row: its groups follow the batch size.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from autopar.errors import AutoparError
from autopar.normalize import MAY_VANISH, MAY_VANISH_NAMES
from autopar.placement import TP, NodePlacement, Replicate, Shard
from autopar.plan import PlanNode

aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
_PASS = MAY_VANISH | _CASTS
_PASS_NAMES = MAY_VANISH_NAMES | {str(op) for op in _CASTS}


def _root(node: fx.Node) -> fx.Node:
    """The value a chain of views and casts reads (the node itself outside one)."""
    while node.op == "call_function" and node.target in _PASS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _differs(node: fx.Node, message: str) -> AutoparError:
    return AutoparError(
        f"the model traced at another batch size computes differently: {message} "
        f"({node.format_node()})"
    )


def _plan_root(plan, name: str) -> str:
    """`_root` on the plan's own graph, through its recorded sources."""
    entry = plan.strategies.get(name)
    while entry is not None and entry.op in _PASS_NAMES and entry.sources:
        name = entry.sources[0]
        entry = plan.strategies.get(name)
    return name


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _regrouped(node: fx.Node, placement, planned, shape):
    """`placement` on `shape` for a grouped shard planned on `planned`: the blocks keep their
    size, so a dim that grew or shrank with the batch has as many more or fewer groups."""
    if not isinstance(placement, Shard) or placement.groups == 1 or shape is None:
        return placement
    same_rank = planned is not None and len(planned) == len(shape)
    if (
        not same_rank
        or isinstance(planned[0], list)
        or planned[placement.dim] == shape[placement.dim]
    ):
        return placement
    block = planned[placement.dim] // placement.groups
    if shape[placement.dim] % block:
        raise _differs(node, f"{placement} of a dim of {planned[placement.dim]} on {shape}")
    return Shard(placement.dim, shape[placement.dim] // block)


def _placement_for(plan, node: fx.Node, made: dict) -> NodePlacement | None:
    entry = plan.strategies.get(node.name)
    if entry is None:  # a no-op at the plan's batch size: its input's placement passes
        if node.target not in MAY_VANISH or len(node.all_input_nodes) != 1:
            raise _differs(node, "the plan has no entry for this node")
        have = made.get(node.all_input_nodes[0].name, Replicate())
        return NodePlacement(have, (have,))
    placement = entry.placements.get(TP)
    if placement is None:
        return None
    seen: dict[str, tuple] = {}
    for source, wanted in zip(entry.sources, placement.inputs, strict=True):
        seen.setdefault(
            _plan_root(plan, source), (wanted, getattr(plan.strategies.get(source), "shape", None))
        )
    found = [seen.get(_root(u).name) for u in node.all_input_nodes]
    if None in found:
        raise _differs(node, f"its inputs are not the plan's {entry.sources}")
    inputs = tuple(
        _regrouped(node, wanted, planned, _shape(u))
        for (wanted, planned), u in zip(found, node.all_input_nodes, strict=True)
    )
    return NodePlacement(_regrouped(node, placement.output, entry.shape, _shape(node)), inputs)


def plan_for(plan, graph: fx.Graph):
    """A copy of `plan` whose tp placements and stages name exactly `graph`'s nodes."""
    present = {node.name for node in graph.nodes}
    strategies, made = {}, {}
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in plan.strategies:
                strategies[node.name] = plan.strategies[node.name]
        elif node.op == "call_function":
            placement = _placement_for(plan, node, made)
            entry = plan.strategies.get(node.name)
            sources = [u.name for u in node.all_input_nodes]
            placements = dict(entry.placements) if entry is not None else {}
            if placement is not None:
                placements[TP] = placement
                made[node.name] = placement.output
            op = entry.op if entry is not None else str(node.target)
            strategies[node.name] = PlanNode(op, sources, placements)
    stages = [
        dataclasses.replace(stage, nodes=[n for n in stage.nodes if n in present])
        for stage in plan.stages
    ]
    return dataclasses.replace(plan, strategies=strategies, stages=stages)
