"""Price a chosen set of strategies, item by item, so that a plan can explain itself.

Uses the same cost functions as the ILP, applied to the one choice per node, and
lists every collective the generated code will run with its phase and size.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.placement import Replicate, Shard
from autopar.plan import Collective
from autopar.solver import costs
from autopar.solver.intra_op import _nbytes, allocates, needs_grad_sync, node_compute_seconds


@dataclass
class NodePrice:
    """One node's share of a step: compute, memory it keeps, and (for parameters) state."""

    compute_s: float = 0.0  # forward + backward
    activation_bytes: float = 0.0  # kept for backward, this rank
    param_numel: float = 0.0  # this rank's elements of a parameter placeholder
    param_bytes: float = 0.0  # the same at the training dtype
    optimizer_s: float = 0.0


@dataclass
class TpPricing:
    nodes: dict[str, NodePrice]
    collectives: list[Collective]

    def total(self, field: str) -> float:
        return sum(getattr(price, field) for price in self.nodes.values())


def _layer(traced, name: str):
    info = traced.analysis.nodes.get(name)
    return getattr(info, "layer", None)


def _edge_collectives(traced, chosen, requires_grad, mesh, tp, training, dtype_bytes):
    found = []
    for consumer in traced.graph_module.graph.nodes:
        if consumer.op not in ("call_function", "output"):
            continue
        for slot, producer in enumerate(consumer.all_input_nodes):
            src = chosen[producer.name].output
            dst = Replicate() if consumer.op == "output" else chosen[consumer.name].inputs[slot]
            nbytes = _nbytes(producer, dtype_bytes)
            carries_grad = training and requires_grad.get(producer.name, False)
            ops = costs.reshard_ops(src, dst, nbytes, carries_grad)
            assert ops is not None, (producer.name, consumer.name, src, dst)
            found += [_collective(op, producer, consumer, mesh, tp, traced) for op in ops]
    return _dedup(found)


def _collective(op, producer, consumer, mesh, tp, traced) -> Collective:
    seconds = mesh.tp_collective_time(op.kind, op.nbytes, tp)
    layer = _layer(traced, producer.name)  # a block owns the collectives of what it produces
    return Collective(op.kind, op.phase, producer.name, consumer.name, op.nbytes, seconds, layer)


def _dedup(collectives: list[Collective]) -> list[Collective]:
    """Codegen shares one collective among consumers that want the same placement."""
    seen, unique = set(), []
    for c in collectives:
        key = (c.kind, c.phase, c.producer)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def _grad_sync_collectives(traced, chosen, requires_grad, mesh, tp, training, dtype_bytes):
    if not training:
        return []
    found = []
    for node in traced.graph_module.graph.nodes:
        if not requires_grad.get(node.name):
            continue
        consumers = [u for u in node.users if u.op == "call_function"]
        if any(needs_grad_sync(chosen[u.name], u.all_input_nodes.index(node)) for u in consumers):
            op = costs.CommOp("all_reduce", costs.BACKWARD, _nbytes(node, dtype_bytes))
            found.append(_collective(op, node, consumers[0], mesh, tp, traced))
    return found


def _node_price(traced, node, strategy, requires_grad, mesh, tp, training, dtype_bytes):
    if node.op == "call_function":
        compute = node_compute_seconds(traced, node, strategy, mesh, tp, training, dtype_bytes)
        kept = 0.0
        if training and requires_grad.get(node.name) and allocates(traced, node):
            kept = _nbytes(node, dtype_bytes) / (tp if isinstance(strategy.output, Shard) else 1)
        return NodePrice(compute_s=compute, activation_bytes=kept)
    if node.name in traced.param_fqns and node.users:
        share = tp if strategy.output != Replicate() else 1
        numel = node.meta["val"].numel() / share
        optimizer = costs.optimizer_seconds(int(numel), mesh) if training else 0.0
        return NodePrice(
            param_numel=numel, param_bytes=_nbytes(node, dtype_bytes) / share, optimizer_s=optimizer
        )
    return NodePrice()


def price_tp(traced, chosen, requires_grad, mesh, tp, *, training, dtype_bytes) -> TpPricing:
    nodes = {
        node.name: _node_price(
            traced, node, chosen[node.name], requires_grad, mesh, tp, training, dtype_bytes
        )
        for node in traced.graph_module.graph.nodes
        if node.name in chosen
    }
    collectives = _edge_collectives(traced, chosen, requires_grad, mesh, tp, training, dtype_bytes)
    collectives += _grad_sync_collectives(
        traced, chosen, requires_grad, mesh, tp, training, dtype_bytes
    )
    return TpPricing(nodes, collectives)
