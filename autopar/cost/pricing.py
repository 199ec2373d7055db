"""The cost API: what one node's strategy costs, and what a whole chosen sharding costs.

`node_price` and `edge_reshard` are the only definitions of a node's compute, memory
and optimizer cost and of an edge's reshard: the intra-op ILP builds its objective and
memory rows from them for every candidate, `price_sharding` applies them to the one
chosen strategy per node so that a plan explains itself, and the stage DP and the
summary read that pricing. Compute, communication and memory stay apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from autopar.cost.attention import eager_attention_seconds
from autopar.cost.comm import reshard_seconds
from autopar.cost.compute import node_seconds, optimizer_seconds
from autopar.cost.gemm import local_products
from autopar.cost.loss import loss_logits, loss_seconds, untraced_loss_seconds
from autopar.cost.memory import ATTENTION_CORE, saved_for_backward, tensor_bytes
from autopar.cost.overheads import node_overhead_seconds, optimizer_call_seconds
from autopar.placement import Replicate, Shard
from autopar.reshard import Reshard, defers_to_step, reshard, sole_parameter
from autopar.strategies import Strategy


@dataclass(frozen=True)
class Collective:
    """One collective the generated code runs, for the summary and for explanation."""

    kind: str  # all_reduce, all_gather, reduce_scatter, all_to_all
    phase: str  # forward or backward
    producer: str
    consumer: str
    nbytes: int  # the full tensor
    seconds: float
    layer: int | None
    axis: str = "tp"  # the mesh axis it runs over
    # The part of `seconds` that does not grow with the bytes (the alpha-beta latency
    # term): a microbatch of any size pays it once per run of the collective.
    latency_s: float = 0.0

    def scaled_seconds(self, scale: float) -> float:
        """The collective's time on a microbatch `scale` times the traced batch: the
        bandwidth term scales with the bytes, the latency does not."""
        return scale * (self.seconds - self.latency_s) + self.latency_s


@dataclass(frozen=True)
class NodePrice:
    """One node's share of a training step on one rank, under one strategy."""

    compute_s: float = 0.0  # forward + backward
    forward_s: float = 0.0  # the forward alone: what recomputing the node costs
    comm_s: float = 0.0  # collectives the op's own sharded form runs (Strategy.collectives)
    activation_bytes: float = 0.0  # kept for backward, this rank
    output_bytes: float = 0.0  # the output's size on this rank (what a stage sends)
    attention_core: bool = False  # what selective recomputation recomputes
    param_numel: float = 0.0  # this rank's elements of a parameter placeholder
    param_bytes: float = 0.0  # the same at the training dtype
    optimizer_s: float = 0.0
    overhead_s: float = 0.0  # fixed per call, forward + backward (cost/overheads.py)
    forward_overhead_s: float = 0.0  # the forward's alone
    # forward + backward seconds at a microbatch `scale` times the traced batch, for a cost
    # not linear in the batch (a calibrated loss: cost/loss.py); None: compute_s * scale
    at_scale: Callable[[float], float] | None = None


@dataclass(frozen=True)
class EdgeReshard:
    """The table entry one edge runs, the key codegen shares it by, and whether it waits
    for the end of the step (a parameter's gradient sum: `reshard.defers_to_step`)."""

    key: str
    entry: Reshard
    deferred: bool

    def seconds(self, nbytes: float, price) -> float:
        """Forward and backward time; a deferred sum pays bandwidth only, its bucket the
        latency once per step (`price(kind, nbytes)` is the collective time)."""
        if self.deferred:
            return reshard_seconds(self.entry, nbytes, lambda k, n: price(k, n) - price(k, 0))
        return reshard_seconds(self.entry, nbytes, price)


@dataclass
class ShardingPrice:
    """A chosen sharding priced node by node, with every collective it runs in the graph,
    the parameter gradients it sums over tp once per step, and the loss computed outside
    the graph (the same under every sharding: the output is whole on every rank)."""

    nodes: dict[str, NodePrice]
    collectives: list[Collective]
    deferred_grad_bytes: dict[str, float]  # parameter placeholder -> its gradient's bytes
    untraced_loss: NodePrice | None = None  # on the epilogue (cost/loss.py)

    def total(self, field: str) -> float:
        return sum(getattr(price, field) for price in self.nodes.values())


def local_fraction(placement, tp: int) -> float:
    return 1.0 / tp if isinstance(placement, Shard) else 1.0


def node_price(traced, node: fx.Node, strategy: Strategy, mesh, tp, *, training, dtype_bytes):
    """Compute, kept activations and parameter state of `node` under `strategy`."""
    info = traced.analysis.nodes[node.name]
    fraction = local_fraction(strategy.output, tp)
    if node.op == "call_function":
        share = tp if strategy.splits_work else 1
        if mesh.eager_attention and node.target in ATTENTION_CORE:
            seconds, shape = eager_attention_seconds, {}
        else:
            seconds, shape = node_seconds, {"products": local_products(node, strategy.inputs, tp)}
        compute, forward = (
            seconds(node, info, share, mesh.device, training=t, dtype_bytes=dtype_bytes, **shape)
            for t in (training, False)
        )
        kept = saved_for_backward(node, info, training, dtype_bytes) * fraction
        comm = sum(mesh.tp_collective_time(k, n, tp) for k, n in strategy.collectives)
        overhead, forward_overhead = (
            node_overhead_seconds(info, mesh.device, training=t) for t in (training, False)
        )
        return NodePrice(
            compute_s=compute, forward_s=forward, comm_s=comm, activation_bytes=kept,
            output_bytes=tensor_bytes(node, dtype_bytes) * fraction,
            attention_core=node.target in ATTENTION_CORE,
            overhead_s=overhead, forward_overhead_s=forward_overhead,
        )  # fmt: skip
    if node.name in traced.param_fqns and node.users:  # an unused twin: its tie pays
        numel = node.meta["val"].numel() * fraction
        optimizer = (
            optimizer_seconds(numel, mesh.device, dtype_bytes) + optimizer_call_seconds(mesh.device)
            if training
            else 0.0
        )
        nbytes = tensor_bytes(node, dtype_bytes) * fraction
        return NodePrice(param_numel=numel, param_bytes=nbytes, optimizer_s=optimizer)
    return NodePrice()


def consumer_strategy(consumer: fx.Node, chosen) -> Strategy:
    """`chosen[consumer]`; the graph's output sees every value whole (every rank returns it)."""
    if consumer.op == "output":
        return Strategy(Replicate(), tuple(Replicate() for _ in consumer.all_input_nodes))
    return chosen[consumer.name]


def edge_reshard(traced, producer: fx.Node, made, seen: Strategy, slot: int, training: bool):
    """The `EdgeReshard` for `producer`'s output made as `made`, read through input `slot`
    of a consumer running `seen`; None when the table has no entry. Codegen runs one
    reshard per producer and key, shared by every consumer with that key."""
    carries_grad = training and traced.analysis.nodes[producer.name].requires_grad
    grad = seen.input_grad(slot) if carries_grad else None
    entry = reshard(made, seen.inputs[slot], grad)
    if entry is None:
        return None
    found = sole_parameter(producer, traced.param_fqns)
    deferred = defers_to_step(entry, found[0] if found else None)
    return EdgeReshard(f"{seen.inputs[slot]}~{grad}", entry, deferred)


def _op_collectives(node, strategy, mesh, tp, traced) -> list[Collective]:
    layer = traced.analysis.nodes[node.name].layer
    return [
        Collective(kind, "forward", node.name, node.name, nbytes,
                   mesh.tp_collective_time(kind, nbytes, tp), layer,
                   latency_s=mesh.tp_collective_time(kind, 0, tp))
        for kind, nbytes in strategy.collectives
    ]  # fmt: skip


class PriceMemo:
    """Prices kept across `price_sharding` calls of one search (one mesh, tp, training and
    dtype): a node of a repeated block costs what the same node of an identical block
    costs under the same strategies, so each is priced once, not once per block."""

    def __init__(self):
        self.nodes: dict = {}  # (position or name, strategy) -> NodePrice
        self.edges: dict = {}  # (producer, consumer, made, seen, slot) -> _edge_steps

    @staticmethod
    def where(traced, node: fx.Node):
        """Equal for corresponding nodes of identical blocks (analysis' position key)."""
        info = traced.analysis.nodes.get(node.name)  # the output node has none
        return (info.position if info is not None else None) or node.name


def _edge_steps(traced, producer, made, seen, slot, mesh, tp, training, dtype_bytes):
    """(EdgeReshard, bytes, [(phase, kind, seconds, latency)]) of one edge, names aside."""
    edge = edge_reshard(traced, producer, made, seen, slot, training)
    nbytes = tensor_bytes(producer, dtype_bytes)
    steps = [
        (phase, step.kind, mesh.tp_collective_time(step.kind, nbytes, tp),
         mesh.tp_collective_time(step.kind, 0, tp))
        for phase, step in edge.entry.collectives()
    ] if edge is not None else []  # fmt: skip
    return edge, nbytes, steps


def _edge_collectives(traced, chosen, mesh, tp, training, dtype_bytes, memo: PriceMemo):
    """The collectives the graph runs, and the parameter gradients summed once per step."""
    found, shared, deferred = [], set(), {}
    for consumer in traced.graph_module.graph.nodes:
        if consumer.op not in ("call_function", "output"):
            continue
        seen = consumer_strategy(consumer, chosen)
        if consumer.op == "call_function":
            found += _op_collectives(consumer, seen, mesh, tp, traced)
        for slot, producer in enumerate(consumer.all_input_nodes):
            made = chosen[producer.name].output
            key = (memo.where(traced, producer), memo.where(traced, consumer), made, seen, slot)
            if key not in memo.edges:
                memo.edges[key] = _edge_steps(
                    traced, producer, made, seen, slot, mesh, tp, training, dtype_bytes
                )
            edge, nbytes, steps = memo.edges[key]
            assert edge is not None, (producer.name, consumer.name, str(seen))
            if (producer.name, edge.key) in shared:
                continue
            shared.add((producer.name, edge.key))
            if edge.deferred:
                parameter, _ = sole_parameter(producer, traced.param_fqns)
                deferred[parameter.name] = tensor_bytes(parameter, dtype_bytes)
                continue
            layer = traced.analysis.nodes[producer.name].layer  # a block owns what it makes
            found += [
                Collective(kind, phase, producer.name, consumer.name, nbytes, seconds, layer,
                           latency_s=latency)
                for phase, kind, seconds, latency in steps
            ]  # fmt: skip
    return found, deferred


def price_sharding(
    traced, chosen, mesh, tp, *, training, dtype_bytes, memo: PriceMemo | None = None
) -> ShardingPrice:
    """Every node of `chosen` (node name -> Strategy) priced, and the collectives it runs;
    pass one `PriceMemo` to the calls of one search to price identical blocks once."""
    memo = PriceMemo() if memo is None else memo
    nodes = {}
    for node in traced.graph_module.graph.nodes:
        if node.name not in chosen:
            continue
        key = (memo.where(traced, node), chosen[node.name])
        if key not in memo.nodes:
            memo.nodes[key] = node_price(
                traced, node, chosen[node.name], mesh, tp, training=training,
                dtype_bytes=dtype_bytes,
            )  # fmt: skip
        nodes[node.name] = memo.nodes[key]
    collectives, deferred = _edge_collectives(traced, chosen, mesh, tp, training, dtype_bytes, memo)
    loss = untraced_loss_price(traced, mesh, training=training, dtype_bytes=dtype_bytes)
    return ShardingPrice(nodes, collectives, deferred, loss)


def untraced_loss_price(traced, mesh, *, training, dtype_bytes) -> NodePrice | None:
    """The loss `train_step(inputs, target, loss_fn)` computes on the model's output
    outside the graph (cost/loss.py); None when the
    loss was traced, when nothing trains, or when the model returns no floating tensor."""
    logits = loss_logits(traced.graph_module.graph)
    if traced.traced_loss or logits is None or not training:
        return None
    nbytes = tensor_bytes(logits, dtype_bytes)
    both, forward, overhead, forward_overhead = untraced_loss_seconds(nbytes, mesh.device)
    return NodePrice(compute_s=both, forward_s=forward, overhead_s=overhead,
                     forward_overhead_s=forward_overhead,
                     at_scale=lambda scale: loss_seconds(scale * nbytes, mesh.device))  # fmt: skip
