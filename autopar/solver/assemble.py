"""From the search's winning candidate to the Plan value.

Every node gets one placement per mesh axis the plan splits (an axis of size one is
left out, so a tp=1 plan carries no tensor-parallel placement at all); the collectives
are the tp ones the pricing found plus the data-parallel gradient sync, both from the
reshard table; costs are split into compute, communication and bubble.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autopar.cost.compute import BACKWARD_FLOP_FACTOR
from autopar.cost.pricing import Collective
from autopar.placement import DP, PP, TP, NodePlacement, Shard
from autopar.plan import Cost, Plan, PlanNode, Stage
from autopar.reshard import BACKWARD, FORWARD
from autopar.solver.pipeline import unit_of_nodes
from autopar.solver.sharding import PARAMETER_SYNC, ZERO_SYNC, zero3_gather_seconds
from autopar.strategies import NORMS, SEQUENCE


def _first_input_shape(traced) -> tuple[int, ...]:
    for node in traced.graph_module.graph.nodes:
        if node.name in traced.user_inputs:
            return tuple(int(n) for n in node.meta["val"].shape)
    return ()


def traced_batch(traced) -> int:
    """The batch size (dim 0 of the first user input) the model was traced with."""
    shape = _first_input_shape(traced)
    return shape[0] if shape else 1


def traced_seq_len(traced) -> int | None:
    """The sequence length (dim 1 of the first user input), if it has a dim 1."""
    shape = _first_input_shape(traced)
    return shape[1] if len(shape) > 1 else None


def _tp_placement(node: fx.Node, strategy) -> NodePlacement:
    output = strategy.output
    if isinstance(node.meta.get("val"), list | tuple):
        output = tuple(output for _ in node.meta["val"])
    return NodePlacement(output, strategy.inputs)


def _shape(node: fx.Node) -> list | None:
    """The traced output shape, one per output of a multi-output node, None if no tensor."""
    value = node.meta.get("val")
    if isinstance(value, list | tuple):
        shapes = [_shape_of(v) for v in value]
        return None if None in shapes else shapes
    return _shape_of(value)


def _shape_of(value) -> list[int] | None:
    return [int(n) for n in value.shape] if isinstance(value, torch.Tensor) else None


def plan_nodes(traced, sharding, layout) -> dict[str, PlanNode]:
    """Each node's op, sources, output shape and placements on the axes of size > 1."""
    table = {}
    for node in traced.graph_module.graph.nodes:
        strategy = sharding.result.strategies.get(node.name)
        if strategy is None:
            continue
        placements = {}
        if layout.dp > 1:
            placements[DP] = sharding.strategies.dp[node.name]
        if layout.tp > 1:
            placements[TP] = _tp_placement(node, strategy)
        op = str(node.target) if node.op == "call_function" else node.op
        sources = [arg.name for arg in node.all_input_nodes]
        table[node.name] = PlanNode(op, sources, placements, _shape(node))
    return table


def uses_sequence_parallelism(traced, sharding) -> bool:
    """Does some normalization run split on its sequence dim over tp?"""
    roles = sharding.strategies.roles
    for node in traced.graph_module.graph.nodes:
        strategy = sharding.result.strategies.get(node.name)
        if node.target in NORMS and strategy is not None and isinstance(strategy.output, Shard):
            if roles[node.name][strategy.output.dim] == SEQUENCE:
                return True
    return False


def _stages(traced, best, unit_of) -> list[Stage]:
    split, stages = best.choice.split, []
    for k, (i, j) in enumerate(split.bounds):
        nodes = [n for n, u in unit_of.items() if i <= u < j and n in traced.analysis.nodes]
        layers = [u - 1 for u in range(i, j) if 1 <= u <= len(traced.analysis.layers)]
        stages.append(
            Stage(k, layers, nodes, split.stage_times[k], split.stage_memory[k],
                  best.choice.rank_of_stage[k], split.modes[k])
        )  # fmt: skip
    return stages


def _zero3_gathers(mesh, best) -> list[Collective]:
    """ZeRO-3's traffic per step on the fullest pipeline rank: every microbatch gathers
    each block's parameters for its forward and again for its backward, and
    reduce-scatters its gradients (priced block by block in the stage times)."""
    m = best.choice.num_microbatches
    seconds = m * zero3_gather_seconds(mesh, best.layout, best.grad_bytes)
    steps = [(FORWARD, "parameters gathered per block"), (BACKWARD, "parameters gathered again"),
             (BACKWARD, "gradients reduce-scattered per block")]  # fmt: skip
    kinds = ["all_gather", "all_gather", "reduce_scatter"]
    return [
        Collective(kind, phase, what, "each block", int(m * best.grad_bytes), seconds / 3,
                   None, DP)
        for kind, (phase, what) in zip(kinds, steps, strict=True)
    ]  # fmt: skip


def _grad_syncs(best) -> list[Collective]:
    """The sums of partial gradients once per step, as the table runs them: over tp for the
    parameters whose f waits for the step, over dp for all (the fullest pipeline rank),
    over pp for tied parameters read on several pp ranks."""
    dp_entry = ZERO_SYNC if best.zero >= 1 else PARAMETER_SYNC
    syncs = (
        (TP, "parameter gradients read by split work", best.tp_sync_bytes, best.tp_sync_s,
         PARAMETER_SYNC),
        (DP, "gradients", best.grad_bytes, best.dp_sync_s, dp_entry),
    )  # fmt: skip
    found = []
    for axis, what, nbytes, seconds, entry in syncs:
        steps = entry.collectives() if seconds > 0 else []
        found += [
            Collective(step.kind, phase, what, "optimizer", int(nbytes), seconds / len(steps),
                       None, axis)
            for phase, step in steps
        ]  # fmt: skip
    if best.tied_sync_s > 0:
        found.append(Collective("all_reduce", BACKWARD, "tied parameter gradients", "optimizer",
                                int(best.tied_bytes), best.tied_sync_s, None, PP))  # fmt: skip
    return found  # the loss's mean moves no model tensor: Cost.step_sync_s prices it


def _cost(traced, mesh, sharding, best, training) -> Cost:
    layout, choice = best.layout, best.choice
    scale = best.microbatch_size / traced_batch(traced)
    comm_per_mb = sum(c.scaled_seconds(scale) for c in sharding.pricing.collectives)
    factor = 1 + BACKWARD_FLOP_FACTOR if training else 1
    flops = factor * traced.analysis.total_flops * scale * choice.num_microbatches * layout.dp
    pipeline_work = choice.step_s - choice.bubble_s  # the sends and receives included
    in_graph = min(pipeline_work - choice.p2p_s, comm_per_mb * choice.num_microbatches / layout.pp)
    once = best.dp_sync_s + best.tp_sync_s + best.tied_sync_s + best.loss_mean_s
    comm = in_graph + once + choice.p2p_s
    return Cost(
        step_time_s=best.step_s, compute_s=best.step_s - comm - choice.bubble_s, comm_s=comm,
        bubble_s=choice.bubble_s, memory_per_device_bytes=choice.memory_bytes,
        tflops_per_device=flops / best.step_s / mesh.world_size / 1e12,
        optimizer_s=best.optimizer_s, dp_sync_s=best.dp_sync_s, tp_sync_s=best.tp_sync_s,
        p2p_s=choice.p2p_s, step_sync_s=best.tied_sync_s + best.loss_mean_s,
    )  # fmt: skip


def _unused_twins(traced) -> dict[str, str]:
    """Tied parameters: the placeholder the graph never reads -> the one it reads."""
    read = {n.name for n in traced.graph_module.graph.nodes if n.op == "placeholder" and n.users}
    return {
        (first if duplicate in read else duplicate): (duplicate if duplicate in read else first)
        for duplicate, first in traced.tied_params.items()
    }


def to_plan(traced, mesh, sharding, best, training) -> Plan:
    layout, choice, result = best.layout, best.choice, sharding.result
    layer_of = {n: i.layer for n, i in traced.analysis.nodes.items() if i.layer is not None}
    return Plan(
        dp=layout.dp, tp=layout.tp, pp=layout.pp, num_microbatches=choice.num_microbatches,
        microbatch_size=best.microbatch_size, schedule=choice.schedule,
        strategies=plan_nodes(traced, sharding, layout),
        stages=_stages(traced, best, unit_of_nodes(traced)),
        cost=_cost(traced, mesh, sharding, best, training),
        collectives=sharding.pricing.collectives + _grad_syncs(best)
        + (_zero3_gathers(mesh, best) if best.zero == 3 else []),
        unsupported_ops=sharding.strategies.unsupported,
        model_fingerprint=traced.fingerprint(),
        mesh={**mesh.to_dict(), "description": mesh.describe()},
        mesh_fingerprint=mesh.fingerprint(),
        solver={"status": result.status, "solve_time_s": result.solve_time_s,
                "num_variables": result.num_variables, "num_constraints": result.num_constraints},
        layer_of=layer_of, param_fqns=dict(traced.param_fqns),
        tied_params=_unused_twins(traced), unit_times_s=best.unit_times_s,
        sequence_parallel=layout.tp > 1 and uses_sequence_parallelism(traced, sharding),
        recompute=_recompute(choice.split.modes), zero=best.zero,
        seq_len=traced_seq_len(traced),
        global_batch_size=layout.dp * choice.num_microbatches * best.microbatch_size,
    )  # fmt: skip


def _recompute(modes: tuple[str, ...]) -> str:
    return modes[0] if len(set(modes)) == 1 else "mixed"
