"""Price a chosen set of strategies, item by item, so that a plan can explain itself.

Uses the same cost functions as the ILP, applied to the one choice per node, and
lists every collective the generated code will run with its phase and size.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.placement import Replicate, Shard
from autopar.plan import Collective
from autopar.solver import costs
from autopar.solver.intra_op import _nbytes, allocates, needs_grad_sync, traffic_bytes


@dataclass
class TpPricing:
    compute_s: float
    optimizer_s: float
    collectives: list[Collective]
    param_bytes_local: float  # this rank's parameter bytes at the training dtype
    param_numel_local: float
    activation_bytes: float  # kept for backward, one microbatch


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


def price_tp(traced, chosen, requires_grad, mesh, tp, *, training, dtype_bytes) -> TpPricing:
    compute = optimizer = bytes_local = numel_local = activations = 0.0
    for node in traced.graph_module.graph.nodes:
        strategy = chosen.get(node.name)
        if strategy is None:
            continue
        if node.op == "call_function":
            info = traced.analysis.nodes[node.name]
            nbytes = traffic_bytes(info, dtype_bytes)
            compute += costs.compute_seconds(
                info.flops, nbytes, strategy.splits_work, mesh, tp, training
            )
            if training and requires_grad.get(node.name) and allocates(node):
                share = tp if isinstance(strategy.output, Shard) else 1
                activations += _nbytes(node, dtype_bytes) / share
        elif node.name in traced.param_fqns and node.users:
            numel = node.meta["val"].numel() / (tp if strategy.output != Replicate() else 1)
            numel_local += numel
            bytes_local += _nbytes(node, dtype_bytes) * numel / node.meta["val"].numel()
            optimizer += costs.optimizer_seconds(int(numel), mesh) if training else 0.0
    collectives = _edge_collectives(traced, chosen, requires_grad, mesh, tp, training, dtype_bytes)
    collectives += _grad_sync_collectives(
        traced, chosen, requires_grad, mesh, tp, training, dtype_bytes
    )
    return TpPricing(compute, optimizer, collectives, bytes_local, numel_local, activations)
