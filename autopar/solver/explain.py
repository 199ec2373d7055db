"""Price a chosen set of strategies, item by item, so that a plan can explain itself.

Uses the same cost functions as the ILP, applied to the one choice per node, and
lists every collective the generated code will run with its phase and size.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.placement import Replicate, Shard
from autopar.plan import Collective
from autopar.reshard import reshard
from autopar.solver import costs
from autopar.solver.intra_op import _nbytes, allocates, node_compute_seconds
from autopar.strategies import Strategy


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


def _edge_collectives(traced, chosen, mesh, tp, training, dtype_bytes):
    """Every collective of the reshard table's entries on the plan's edges, each entry once
    per (producer, placement seen, gradient), as codegen shares it among consumers."""
    found, seen = [], set()
    for consumer in traced.graph_module.graph.nodes:
        if consumer.op not in ("call_function", "output"):
            continue
        strategy = _consumer_strategy(consumer, chosen)
        for slot, producer in enumerate(consumer.all_input_nodes):
            carries_grad = training and traced.analysis.nodes[producer.name].requires_grad
            dst = strategy.inputs[slot]
            grad = strategy.input_grad(slot) if carries_grad else None
            entry = reshard(chosen[producer.name].output, dst, grad)
            assert entry is not None, (producer.name, consumer.name, dst, grad)
            if (producer.name, dst, grad) in seen:
                continue
            seen.add((producer.name, dst, grad))
            nbytes = _nbytes(producer, dtype_bytes)
            found += [
                _collective(phase, step.kind, nbytes, producer, consumer, mesh, tp, traced)
                for phase, step in entry.collectives()
            ]
    return found


def _consumer_strategy(consumer, chosen) -> Strategy:
    if consumer.op == "output":  # every rank returns the whole output
        return Strategy(Replicate(), tuple(Replicate() for _ in consumer.all_input_nodes))
    return chosen[consumer.name]


def _collective(phase, kind, nbytes, producer, consumer, mesh, tp, traced) -> Collective:
    seconds = mesh.tp_collective_time(kind, nbytes, tp)
    layer = _layer(traced, producer.name)  # a block owns the collectives of what it produces
    return Collective(kind, phase, producer.name, consumer.name, nbytes, seconds, layer)


def _node_price(traced, node, strategy, mesh, tp, training, dtype_bytes):
    if node.op == "call_function":
        compute = node_compute_seconds(traced, node, strategy, mesh, tp, training, dtype_bytes)
        kept = 0.0
        if training and traced.analysis.nodes[node.name].requires_grad and allocates(traced, node):
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


def price_tp(traced, chosen, mesh, tp, *, training, dtype_bytes) -> TpPricing:
    nodes = {
        node.name: _node_price(traced, node, chosen[node.name], mesh, tp, training, dtype_bytes)
        for node in traced.graph_module.graph.nodes
        if node.name in chosen
    }
    collectives = _edge_collectives(traced, chosen, mesh, tp, training, dtype_bytes)
    return TpPricing(nodes, collectives)
