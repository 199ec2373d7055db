"""The outer search: every (dp, tp, pp) layout of the mesh, each priced by the inner solvers.

For each factorization dp * tp * pp = world size (tp inside a node first, since its
collectives are the most frequent) the intra-op ILP picks the tensor-parallel
shardings; the data-parallel gradient all-reduce and the optimizer step are added;
the cheapest layout that fits in memory becomes the Plan. Any degree can be pinned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from autopar.errors import AutoparError, PlanError
from autopar.placement import Replicate
from autopar.plan import Cost, Plan, Stage
from autopar.solver import costs
from autopar.solver.explain import price_tp
from autopar.solver.intra_op import solve_intra_op
from autopar.strategies import graph_strategies


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def max_heads(traced) -> int | None:
    """The fewest heads any attention in the graph has (tp cannot exceed it)."""
    heads = [
        node.meta["val"].shape[1]
        for node in traced.graph_module.graph.nodes
        if node.target == torch.ops.aten.scaled_dot_product_attention.default
    ]
    return min(heads) if heads else None


def layouts(traced, mesh, dp=None, tp=None, pp=None) -> list[Layout]:
    """Every layout the pins allow, or an AutoparError saying why none is possible."""
    world = mesh.world_size
    _check_pins(traced, mesh, dp, tp, pp)
    found = []
    for t in _divisors(world):
        for p in _divisors(world // t):
            d = world // (t * p)
            if (tp or t) != t or (pp or p) != p or (dp or d) != d:
                continue
            if tp is None and t > mesh.devices_per_node:
                continue  # tensor parallelism across nodes only when pinned
            if p > 1:
                continue  # pipeline stages are planned by solver/stages.py (not yet)
            found.append(Layout(d, t, p))
    if not found:
        raise AutoparError(
            f"no layout with dp={dp}, tp={tp}, pp={pp} for world size {world}: pipeline "
            "parallelism is not available yet; pin pp=1 or leave it unset"
        )
    return found


def _check_pins(traced, mesh, dp, tp, pp) -> None:
    world = mesh.world_size
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp)):
        if value is not None and (not isinstance(value, int) or value < 1 or world % value):
            raise AutoparError(
                f"{name}={value!r} must be a positive divisor of the world size {world}"
            )
    pinned = [v for v in (dp, tp, pp) if v is not None]
    if len(pinned) == 3 and math.prod(pinned) != world:
        raise AutoparError(
            f"dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} must equal the world size {world}"
        )
    heads = max_heads(traced)
    if tp is not None and heads is not None and tp > heads:
        raise AutoparError(
            f"tp={tp} is larger than the {heads} attention heads the model has; pick tp <= {heads}"
        )


def _dp_sync_seconds(mesh, layout: Layout, grad_bytes: float) -> float:
    ranks = range(0, layout.dp * layout.tp, layout.tp)
    return mesh.collective_time("all_reduce", grad_bytes, ranks) if layout.dp > 1 else 0.0


def _strategies_text(traced, chosen) -> dict[str, dict]:
    table = {}
    for node in traced.graph_module.graph.nodes:
        strategy = chosen.get(node.name)
        if strategy is None:
            continue
        output = str(strategy.output)
        pieces = node.meta.get("val")
        if isinstance(pieces, (list, tuple)):
            output = [output] * len(pieces)
        table[node.name] = {
            "op": str(node.target) if node.op == "call_function" else node.op,
            "output": output,
            "inputs": [str(p) for p in strategy.inputs],
            "sources": [arg.name for arg in node.all_input_nodes],
        }
    return table


def _plan_layout(traced, mesh, layout, *, training, dtype_bytes, time_limit_s, batch):
    strategies = graph_strategies(traced, layout.tp)
    result = solve_intra_op(
        traced, strategies, mesh, layout.tp, training=training, dtype_bytes=dtype_bytes,
        time_limit_s=time_limit_s,
    )  # fmt: skip
    pricing = price_tp(
        traced, result.strategies, strategies.requires_grad, mesh, layout.tp,
        training=training, dtype_bytes=dtype_bytes,
    )  # fmt: skip
    comm = sum(c.seconds for c in pricing.collectives)
    dp_sync = _dp_sync_seconds(mesh, layout, pricing.param_bytes_local) if training else 0.0
    step = pricing.compute_s + pricing.optimizer_s + comm + dp_sync
    state_bytes = costs.STATE_BYTES_PER_PARAM if training else dtype_bytes
    memory = pricing.param_numel_local * state_bytes + pricing.activation_bytes
    factor = 1 + costs.BACKWARD_FLOP_FACTOR if training else 1
    flops = factor * traced.analysis.total_flops * layout.dp
    cost = Cost(
        step_time_s=step, compute_s=pricing.compute_s + pricing.optimizer_s,
        comm_s=comm + dp_sync, bubble_s=0.0, memory_per_device_bytes=memory,
        tflops_per_device=flops / step / mesh.world_size / 1e12 if step else 0.0,
    )  # fmt: skip
    layer_of = {n: i.layer for n, i in traced.analysis.nodes.items() if i.layer is not None}
    stage = Stage(0, sorted(set(layer_of.values())), list(result.strategies), step, memory)
    plan = Plan(
        dp=layout.dp, tp=layout.tp, pp=layout.pp, num_microbatches=1, microbatch_size=batch,
        schedule="none", strategies=_strategies_text(traced, result.strategies), stages=[stage],
        cost=cost, collectives=pricing.collectives, unsupported_ops=strategies.unsupported,
        model_fingerprint=traced.fingerprint(), mesh={**mesh.to_dict(), "description":
        mesh.describe()}, mesh_fingerprint=mesh.fingerprint(),
        solver={"status": result.status, "solve_time_s": result.solve_time_s,
                "num_variables": result.num_variables, "num_constraints": result.num_constraints},
        layer_of=layer_of, param_fqns=dict(traced.param_fqns),
    )  # fmt: skip
    return plan


def search(
    traced, mesh, *, dp=None, tp=None, pp=None, training=True, dtype_bytes=None,
    time_limit_s=None, batch=1, progress=None,
) -> Plan:  # fmt: skip
    """The cheapest plan over all layouts the pins allow that fits in memory."""
    candidates = layouts(traced, mesh, dp, tp, pp)
    dtype_bytes = dtype_bytes or mesh.device.dtype_bytes
    best, failures, start = None, [], time.perf_counter()
    for layout in candidates:
        if progress:
            progress(layout)
        try:
            plan = _plan_layout(
                traced, mesh, layout, training=training, dtype_bytes=dtype_bytes,
                time_limit_s=time_limit_s, batch=batch,
            )  # fmt: skip
        except PlanError as error:
            failures.append(f"dp={layout.dp} tp={layout.tp} pp={layout.pp}: {error}")
            continue
        if best is None or plan.cost.step_time_s < best.cost.step_time_s:
            best = plan
    if best is None:
        raise PlanError("no layout fits:\n  " + "\n  ".join(failures))
    best.solver["search_time_s"] = time.perf_counter() - start
    best.solver["layouts_tried"] = len(candidates)
    return best


__all__ = ["Layout", "layouts", "search", "Replicate"]
