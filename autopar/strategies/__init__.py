"""Candidate shardings for every node of a traced graph, per mesh axis.

`graph_strategies(traced, tp)` walks the graph once in order and, per node, asks the
op family's rule (one table, `RULES`) for its `OpSpec`, then enumerates the
tensor-parallel strategies valid at degree `tp`. It also gives every node its one
data-parallel placement (`GraphStrategies.dp`): the batch dim sharded, everything
else (parameters, masks built from constants) replicated.

Which dims are batch and which are sequence comes from a policy, a function of each
user input (`input_roles`, default `default_input_roles`), and is traced forward
through the rules' dim links (strategies/roles.py). Batch dims are never sharded on
tp (that is the data-parallel axis' job); a dim merged from batch rows and heads
(`BatchMajor`) only within each row. Sequence dims may be (sequence parallelism) unless
`sequence_parallel=False`; with `sequence_parallel=True` every normalization whose
sequence dim can be split must split it. Block-interleaved shards `Shard(d, groups=k)`
are offered on the chain that feeds an equal k-way `split` (a fused QKV
projection, see `_group_hints`) and on a merged batch x heads dim.

Ops without a rule, and ops whose output is not floating point (masks, ids), run
replicated; the former are listed in `GraphStrategies.unsupported`.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from autopar.placement import NodePlacement, Replicate, Shard
from autopar.strategies import (
    attention,
    creation,
    elementwise,
    embedding,
    experts,
    indexing,
    loss,
    matmul,
    norm,
    view,
)
from autopar.strategies.base import NodeShapes, OpSpec, R, Strategy, enumerate_strategies
from autopar.strategies.roles import BATCH, SEQUENCE, is_batch, out_roles

RULES = {
    **elementwise.RULES,
    **matmul.RULES,
    **attention.RULES,
    **norm.RULES,
    **embedding.RULES,
    **loss.RULES,
    **view.RULES,
    **indexing.RULES,
    **creation.RULES,
}
STOP_GROUP_HINTS = set(matmul.RULES)
NORMS = {torch.ops.aten.layer_norm.default, torch.ops.aten.mean.dim}  # RMSNorm's statistic

__all__ = ["GraphStrategies", "Strategy", "default_input_roles", "graph_strategies", "RULES"]

InputRoles = Callable[[str, tuple[int, ...], torch.dtype], tuple[str | None, ...]]


def default_input_roles(name: str, shape: tuple[int, ...], dtype: torch.dtype):
    """Dim 0 of every user input is its batch; dim 1 of an integer input (token ids,
    attention masks, positions) is its sequence, and so are the height and width of a
    4-d floating input (an image: a vision transformer's patches are its tokens, split
    only under sequence parallelism). Other dims have no role."""
    roles: list[str | None] = [None] * len(shape)
    if roles:
        roles[0] = BATCH
    if len(roles) > 1 and not dtype.is_floating_point:
        roles[1] = SEQUENCE
    if len(roles) == 4 and dtype.is_floating_point:
        roles[2:] = [SEQUENCE, SEQUENCE]
    return tuple(roles)


@dataclass
class GraphStrategies:
    candidates: dict[str, list[Strategy]]  # node name -> tp strategies, replicated first
    unsupported: list[str]  # call_function nodes with no rule, run replicated
    dp: dict[str, NodePlacement]  # node name -> its one data-parallel placement
    roles: dict[str, tuple[str | None, ...]]  # node name -> role of each output dim


def output_shape(node: fx.Node, index: int | None = None) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = val[index or 0] if val else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _first_tensor(node: fx.Node):
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = val[0] if val else None
    return val if isinstance(val, torch.Tensor) else None


def _is_float(node: fx.Node) -> bool:
    val = _first_tensor(node)
    return val is not None and val.dtype.is_floating_point


def _input_shapes(node: fx.Node):
    shapes = []
    for arg in node.all_input_nodes:
        index = node.args[1] if node.target is operator.getitem else None
        shapes.append(output_shape(arg, index))
    return tuple(shapes)


def _rule(target):
    """The op's rule: by op object, else by qualified name (ops registered late)."""
    rule = RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = experts.NAMED_RULES.get(target.overloadpacket._qualified_op_name)
    return rule


def _spec(node: fx.Node, roles: dict, kept: frozenset) -> tuple[OpSpec | None, NodeShapes | None]:
    rule = _rule(node.target)
    out, inputs = output_shape(node), _input_shapes(node)
    if rule is None or out is None or any(s is None for s in inputs):
        return None, None
    known = tuple(roles.get(arg.name, ()) for arg in node.all_input_nodes)
    spec = rule(node, NodeShapes(out, inputs, (None,) * len(out), in_roles=known))
    return spec, NodeShapes(out, inputs, out_roles(spec, node, roles, out, inputs), kept)


def _group_hints(graph: fx.Graph) -> dict[str, dict[int, set[int]]]:
    """Walk up from each equal k-way split to the matmul that produced it."""
    hints: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for node in graph.nodes:
        if RULES.get(node.target) is not view.split_rule:
            continue
        pieces = [s.shape for s in node.meta["val"]]
        dim = (node.args[2] if len(node.args) > 2 else 0) % len(pieces[0])
        if len(pieces) > 1 and len({p[dim] for p in pieces}) == 1:
            _hint_upstream(node.args[0], dim, len(pieces), hints)
    return hints


def _hint_upstream(node: fx.Node, dim: int, groups: int, hints) -> None:
    while node.op == "call_function":
        hints[node.name][dim].add(groups)
        spec, _ = _spec(node, {}, frozenset())
        if node.target in STOP_GROUP_HINTS or spec is None:
            return
        link = next((lk for lk in spec.links if lk.out_dim == dim and lk.keeps_groups), None)
        if link is None or link.in_dims[0] is None:
            return
        node, dim = node.all_input_nodes[0], link.in_dims[0]


def _replicated(node: fx.Node) -> list[Strategy]:
    return [Strategy(R, tuple(R for _ in node.all_input_nodes))]


def _parameter_strategies(param: fx.Node, candidates: dict) -> list[Strategy]:
    """A parameter may be stored replicated or in any shard a consumer would like to see."""
    wanted = [R]
    for user in param.users:
        index = user.all_input_nodes.index(param)
        wanted += [s.inputs[index] for s in candidates.get(user.name, ()) if s.inputs]
    return [Strategy(p, ()) for p in dict.fromkeys(wanted) if p == R or isinstance(p, Shard)]


def _sequence_parallel(node: fx.Node, found: list[Strategy], roles) -> list[Strategy]:
    """A normalization's strategies that split its sequence dim, if it has any."""
    if node.target not in NORMS:
        return found
    split = [s for s in found if isinstance(s.output, Shard) and roles[s.output.dim] == SEQUENCE]
    return split or found


def _node_candidates(node, spec, shapes, tp, hints, sequence_parallel) -> list[Strategy]:
    options = lambda d: (1, *sorted(hints[node.name][d]))  # noqa: E731
    found = enumerate_strategies(spec, shapes, tp, options)
    return _sequence_parallel(node, found, shapes.out_roles) if sequence_parallel else found


def _dp_placement(node: fx.Node, roles: dict) -> NodePlacement:
    """The batch dim sharded over dp, if the value has one; its inputs as they were made."""

    def made(arg: fx.Node):
        batch = [d for d, role in enumerate(roles.get(arg.name, ())) if is_batch(role)]
        return Shard(batch[0]) if batch else Replicate()

    output = made(node)
    if isinstance(node.meta.get("val"), list | tuple):
        output = tuple(output for _ in node.meta["val"])
    return NodePlacement(output, tuple(made(arg) for arg in node.all_input_nodes))


def _placeholder_roles(node: fx.Node, traced, input_roles: InputRoles) -> tuple:
    val = _first_tensor(node)
    if val is None:
        return ()
    if node.name not in traced.user_inputs:
        return (None,) * val.dim()
    return tuple(input_roles(node.name, tuple(val.shape), val.dtype))


def graph_strategies(
    traced, tp: int, *, sequence_parallel: bool | None = None,
    input_roles: InputRoles = default_input_roles,
) -> GraphStrategies:  # fmt: skip
    """Candidates on the tp axis and the one dp placement of every node (module docstring)."""
    graph = traced.graph_module.graph
    hints = _group_hints(graph)
    kept = frozenset({BATCH} if sequence_parallel is not False else {BATCH, SEQUENCE})
    candidates, unsupported, roles = {}, [], {}
    for node in graph.nodes:
        if node.op == "placeholder":
            roles[node.name] = _placeholder_roles(node, traced, input_roles)
            candidates[node.name] = [Strategy(R, ())]
        elif node.op == "call_function":
            spec, shapes = _spec(node, roles, kept)
            roles[node.name] = shapes.out_roles if shapes else ()
            if spec is None or not _is_float(node):
                if _rule(node.target) is None and _is_float(node):
                    unsupported.append(node.name)
                candidates[node.name] = _replicated(node)
                continue
            candidates[node.name] = _node_candidates(
                node, spec, shapes, tp, hints, sequence_parallel
            )
    for name in traced.param_fqns:
        param = next(n for n in graph.nodes if n.name == name)
        candidates[name] = _parameter_strategies(param, candidates)
    dp = {
        node.name: _dp_placement(node, roles)
        for node in graph.nodes
        if node.op in ("placeholder", "call_function")
    }
    return GraphStrategies(candidates, unsupported, dp, roles)
