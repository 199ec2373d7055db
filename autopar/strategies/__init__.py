"""Candidate shardings for every node of a traced graph on the tensor-parallel axis.

`graph_strategies(traced, tp)` walks the graph once in order and, per node, asks the
op family's rule (one table, `RULES`) for its `OpSpec`, then enumerates the
strategies valid at degree `tp`. Two graph-wide facts shape the candidates:

* token dims (batch and sequence, traced forward from the user's inputs) are never
  sharded on the tp axis: splitting tokens is the data-parallel axis' job;
* block-interleaved shards `Shard(d, groups=k)` are offered only on the chain that
  feeds an equal k-way `split` (a fused QKV projection), see `_group_hints`.

Ops without a rule, and ops whose output is not floating point (masks, ids), run
replicated; the former are listed in `GraphStrategies.unsupported`.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from autopar.placement import Shard
from autopar.strategies import attention, elementwise, embedding, matmul, norm, view
from autopar.strategies.base import NodeShapes, OpSpec, R, Strategy, enumerate_strategies

RULES = {
    **elementwise.RULES,
    **matmul.RULES,
    **attention.RULES,
    **norm.RULES,
    **embedding.RULES,
    **view.RULES,
}
STOP_GROUP_HINTS = set(matmul.RULES)

__all__ = ["GraphStrategies", "Strategy", "graph_strategies", "RULES"]


@dataclass
class GraphStrategies:
    candidates: dict[str, list[Strategy]]  # node name -> strategies, replicated first
    unsupported: list[str]  # call_function nodes with no rule, run replicated


def output_shape(node: fx.Node, index: int | None = None) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = val[index or 0] if val else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = val[0] if val else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _input_shapes(node: fx.Node):
    shapes = []
    for arg in node.all_input_nodes:
        index = node.args[1] if node.target is operator.getitem else None
        shapes.append(output_shape(arg, index))
    return tuple(shapes)


def _spec(node: fx.Node, tokens: dict) -> tuple[OpSpec | None, NodeShapes | None]:
    rule = RULES.get(node.target)
    out, inputs = output_shape(node), _input_shapes(node)
    if rule is None or out is None or any(s is None for s in inputs):
        return None, None
    out_tokens = tuple(False for _ in out)
    shapes = NodeShapes(out, inputs, out_tokens)
    spec = rule(node, shapes)
    out_tokens = _token_dims(spec, node, tokens, len(out))
    return spec, NodeShapes(out, inputs, out_tokens)


def _token_dims(spec: OpSpec, node: fx.Node, tokens: dict, rank: int) -> tuple[bool, ...]:
    flags = [False] * rank
    for link in spec.links:
        for arg, dim in zip(node.all_input_nodes, link.in_dims, strict=True):
            if dim is not None and tokens.get(arg.name, ())[dim : dim + 1] == (True,):
                flags[link.out_dim] = True
    return tuple(flags)


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
        spec, _ = _spec(node, {})
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


def graph_strategies(traced, tp: int) -> GraphStrategies:
    graph = traced.graph_module.graph
    hints = _group_hints(graph)
    candidates, unsupported, tokens = {}, [], {}
    for node in graph.nodes:
        if node.op == "placeholder":
            shape = output_shape(node) or ()
            tokens[node.name] = tuple(node.name in traced.user_inputs for _ in shape)
            candidates[node.name] = [Strategy(R, ())]
        elif node.op == "call_function":
            spec, shapes = _spec(node, tokens)
            tokens[node.name] = shapes.out_tokens if shapes else ()
            if spec is None or not _is_float(node):
                if node.target not in RULES and _is_float(node):
                    unsupported.append(node.name)
                candidates[node.name] = _replicated(node)
                continue
            options = lambda d, name=node.name: (1, *sorted(hints[name][d]))  # noqa: E731
            candidates[node.name] = enumerate_strategies(spec, shapes, tp, options)
    for name in traced.param_fqns:
        param = next(n for n in graph.nodes if n.name == name)
        candidates[name] = _parameter_strategies(param, candidates)
    return GraphStrategies(candidates, unsupported)
