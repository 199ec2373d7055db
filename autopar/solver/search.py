"""The outer search: every (dp, tp, pp) layout, microbatch count and schedule.

For each tensor-parallel degree the intra-op ILP picks the shardings once (on the
traced example batch). For each factorization dp * tp * pp = world size that fits
the hierarchy (tp inside a node unless pinned), each microbatch count and each
schedule, the stage DP splits the units into stages; the data-parallel gradient
all-reduce and the optimizer step are added. The cheapest layout that fits in
memory becomes the Plan. Any of dp, tp, pp, microbatches, microbatch_size and
schedule can be pinned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from autopar.cost.compute import BACKWARD_FLOP_FACTOR
from autopar.cost.memory import state_bytes_per_param
from autopar.cost.pricing import price_sharding
from autopar.errors import AutoparError, PlanError, SolverTimeLimit
from autopar.plan import Cost, Plan, Stage
from autopar.solver.intra_op import solve_intra_op
from autopar.solver.pipeline import SCHEDULES, build_units, evaluate, unit_of_nodes
from autopar.strategies import graph_strategies

MAX_MICROBATCHES = 1024  # a bound on the search, far above what schedules use (GPT-3: 192)


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int


@dataclass(frozen=True)
class Pins:
    """What the caller fixed; None leaves it to the search."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    microbatches: int | None = None
    microbatch_size: int | None = None
    schedule: str | None = None


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


def normalize_schedule(schedule: str | None) -> str | None:
    if schedule is None:
        return None
    name = str(schedule).lower().replace("_", "").replace("-", "")
    if name not in SCHEDULES:
        raise AutoparError(
            f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)} (case-insensitive)"
        )
    return name


def layouts(traced, mesh, pins: Pins) -> list[Layout]:
    """Every layout the pins allow, or an AutoparError saying why none is possible."""
    world = mesh.world_size
    _check_pins(traced, mesh, pins)
    num_units = len(traced.analysis.layers) + 2
    found = []
    for t in _divisors(world):
        for p in _divisors(world // t):
            d = world // (t * p)
            if any(pin not in (None, v) for pin, v in ((pins.tp, t), (pins.pp, p), (pins.dp, d))):
                continue
            if pins.tp is None and t > mesh.devices_per_node:
                continue  # tensor parallelism across nodes only when pinned
            if p <= num_units:
                found.append(Layout(d, t, p))
    if not found:
        raise AutoparError(
            f"no layout with dp={pins.dp}, tp={pins.tp}, pp={pins.pp} for world size {world}: "
            f"the model has {num_units} pipeline units (blocks plus prologue and epilogue), "
            "so pp cannot exceed that"
        )
    return found


def _check_pins(traced, mesh, pins: Pins) -> None:
    world = mesh.world_size
    for name in ("dp", "tp", "pp"):
        value = getattr(pins, name)
        if value is not None and (not isinstance(value, int) or value < 1 or world % value):
            raise AutoparError(
                f"{name}={value!r} must be a positive divisor of the world size {world}"
            )
    degrees = (pins.dp, pins.tp, pins.pp)
    if None not in degrees and math.prod(degrees) != world:
        raise AutoparError(
            f"dp*tp*pp = {pins.dp}*{pins.tp}*{pins.pp} = {math.prod(degrees)} must equal the "
            f"world size {world}"
        )
    heads = max_heads(traced)
    if pins.tp is not None and heads is not None and pins.tp > heads:
        raise AutoparError(
            f"tp={pins.tp} is larger than the {heads} attention heads the model has; "
            f"pick tp <= {heads}"
        )


def _microbatch_options(replica_batch: int, pp: int, pins: Pins) -> list[tuple[int, int]]:
    """(microbatches, microbatch size) pairs that split one replica's batch evenly."""
    options = []
    for m in _divisors(replica_batch):
        size = replica_batch // m
        if m > MAX_MICROBATCHES or pins.microbatches not in (None, m):
            continue
        if pins.microbatch_size not in (None, size):
            continue
        if pp == 1 and pins.microbatches is None and pins.microbatch_size is None and m > 1:
            continue  # without a pipeline, splitting the batch only adds overhead
        options.append((m, size))
    return options


def _p2p(mesh, layout: Layout):
    if layout.pp == 1:
        return lambda nbytes: 0.0
    neighbours = (0, layout.dp * layout.tp)  # pp is the outermost mesh axis
    # forward activation and backward gradient cross each boundary once per microbatch
    return lambda nbytes: 2 * mesh.collective_time("send_recv", nbytes, neighbours)


def _dp_sync_seconds(mesh, layout: Layout, grad_bytes: float) -> float:
    if layout.dp == 1:
        return 0.0
    return mesh.collective_time(
        "all_reduce", grad_bytes, range(0, layout.dp * layout.tp, layout.tp)
    )


@dataclass
class _TpSolution:
    tp: int
    result: object
    strategies: object
    pricing: object


def _solve_tp(
    traced, mesh, tp, *, training, dtype_bytes, state_bytes, time_limit_s, max_pp
) -> _TpSolution:
    strategies = graph_strategies(traced, tp)
    # the ILP sees the whole model; with pp stages each device holds about 1/pp of it
    budget = mesh.device.memory_bytes * max_pp
    result = solve_intra_op(
        traced, strategies, mesh, tp, training=training, dtype_bytes=dtype_bytes,
        memory_budget_bytes=budget, time_limit_s=time_limit_s, state_bytes_per_param=state_bytes,
    )  # fmt: skip
    pricing = price_sharding(
        traced, result.strategies, mesh, tp, training=training, dtype_bytes=dtype_bytes,
    )  # fmt: skip
    return _TpSolution(tp, result, strategies, pricing)


@dataclass
class _TpSolver:
    """Solves the intra-op ILP once per tp degree; remembers failures for the error."""

    traced: object
    mesh: object
    training: bool
    dtype_bytes: int
    state_bytes: float
    time_limit_s: float | None
    max_pp: int
    solutions: dict = field(default_factory=dict)  # tp -> _TpSolution, or None if it failed
    failures: list = field(default_factory=list)

    def __call__(self, tp: int) -> _TpSolution | None:
        if tp not in self.solutions:
            try:
                self.solutions[tp] = _solve_tp(
                    self.traced, self.mesh, tp, training=self.training,
                    dtype_bytes=self.dtype_bytes, state_bytes=self.state_bytes,
                    time_limit_s=self.time_limit_s, max_pp=self.max_pp,
                )  # fmt: skip
            except SolverTimeLimit:
                raise
            except PlanError as error:
                self.solutions[tp] = None
                self.failures.append(f"tp={tp}: {error}")
        return self.solutions[tp]


@dataclass
class _Candidate:
    layout: Layout
    choice: object
    microbatch_size: int
    units: list
    step_s: float
    optimizer_s: float
    dp_sync_s: float

    @property
    def seconds_per_sample(self) -> float:
        """What the search minimizes: without a pinned global batch, dp changes how many
        samples a step processes, so steps are compared per sample."""
        samples = self.layout.dp * self.choice.num_microbatches * self.microbatch_size
        return self.step_s / samples


def _candidates_for(traced, mesh, solution, layout, pins, replica_batch, context):
    training, dtype_bytes, traced_batch, unit_of, state_bytes = context
    schedules = [pins.schedule] if pins.schedule else list(SCHEDULES)
    if layout.pp == 1 and not pins.schedule:
        schedules = ["gpipe"]  # one stage: every schedule is gradient accumulation
    for m, size in _microbatch_options(replica_batch, layout.pp, pins):
        units = build_units(
            traced, solution.pricing, unit_of, scale=size / traced_batch,
            dtype_bytes=dtype_bytes, state_bytes_per_param=state_bytes,
        )  # fmt: skip
        for schedule in schedules:
            choice = evaluate(
                units, layout.pp, m, schedule, _p2p(mesh, layout), mesh.device.memory_bytes
            )
            if choice is not None:
                yield _finish(
                    traced, mesh, solution, layout, choice, size, units, unit_of, training
                )


def _finish(traced, mesh, solution, layout, choice, size, units, unit_of, training):
    optimizer = [0.0] * layout.pp
    grads = [0.0] * layout.pp
    for name, price in solution.pricing.nodes.items():
        if price.param_numel:
            stage = _stage_of_unit(choice.split, unit_of.get(name, 0))
            optimizer[choice.rank_of_stage[stage]] += price.optimizer_s
            grads[choice.rank_of_stage[stage]] += price.param_bytes
    dp_sync = _dp_sync_seconds(mesh, layout, max(grads)) if training else 0.0
    step = choice.step_s + max(optimizer) + dp_sync
    return _Candidate(layout, choice, size, units, step, max(optimizer), dp_sync)


def _stage_of_unit(split, unit: int) -> int:
    return next(k for k, (i, j) in enumerate(split.bounds) if i <= unit < j)


def search(traced, mesh, *, pins: Pins | None = None, training=True, dtype_bytes=None,
           optimizer="adam", time_limit_s=None, batch=1, global_batch_size=None,
           progress=None) -> Plan:  # fmt: skip
    """The cheapest plan over everything the pins allow that fits in memory."""
    start = time.perf_counter()
    pins = pins or Pins()
    pins = Pins(**{**pins.__dict__, "schedule": normalize_schedule(pins.schedule)})
    candidates = layouts(traced, mesh, pins)
    dtype_bytes = dtype_bytes or mesh.device.dtype_bytes
    unit_of = unit_of_nodes(traced)
    state_bytes = state_bytes_per_param(training, dtype_bytes, optimizer)
    context = (training, dtype_bytes, batch, unit_of, state_bytes)
    solve = _TpSolver(traced, mesh, training, dtype_bytes, state_bytes, time_limit_s,
                      max_pp=max(c.pp for c in candidates))  # fmt: skip
    best, tried = None, 0
    for layout in candidates:
        if progress:
            progress(layout)
        solution = solve(layout.tp)
        replica_batch = _replica_batch(global_batch_size, batch, layout.dp)
        if solution is None or replica_batch is None:
            continue
        for candidate in _candidates_for(
            traced, mesh, solution, layout, pins, replica_batch, context
        ):
            tried += 1
            if best is None or candidate.seconds_per_sample < best.seconds_per_sample:
                best = candidate
    if best is None:
        raise PlanError(_nothing_fits(mesh, pins, solve.failures))
    plan = _to_plan(traced, mesh, solve.solutions[best.layout.tp], best, training, dtype_bytes)
    ilp_time = sum(s.result.solve_time_s for s in solve.solutions.values() if s is not None)
    plan.solver.update(
        search_time_s=time.perf_counter() - start, layouts_tried=tried, ilp_time_s=ilp_time
    )
    return plan


def _replica_batch(global_batch_size, batch, dp) -> int | None:
    if global_batch_size is None:
        return batch
    return global_batch_size // dp if global_batch_size % dp == 0 else None


def _nothing_fits(mesh, pins, failures) -> str:
    detail = "".join(f"\n  {f}" for f in failures)
    return (
        f"no plan fits in {mesh.device.memory_bytes / 2**30:.0f} GiB per device with "
        f"{', '.join(f'{k}={v}' for k, v in pins.__dict__.items() if v is not None) or 'no pins'}; "
        "use more devices, allow a larger pp, more microbatches or a smaller batch" + detail
    )


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


def _stages(traced, best, unit_of) -> list[Stage]:
    split, stages = best.choice.split, []
    for k, (i, j) in enumerate(split.bounds):
        nodes = [n for n, u in unit_of.items() if i <= u < j and n in traced.analysis.nodes]
        layers = [u - 1 for u in range(i, j) if 1 <= u <= len(traced.analysis.layers)]
        stages.append(
            Stage(k, layers, nodes, split.stage_times[k], split.stage_memory[k],
                  best.choice.rank_of_stage[k])
        )  # fmt: skip
    return stages


def _to_plan(traced, mesh, solution, best, training, dtype_bytes) -> Plan:
    layout, choice = best.layout, best.choice
    comm_per_mb = sum(c.seconds for c in solution.pricing.collectives) * (
        best.microbatch_size / traced_batch(traced)
    )
    factor = 1 + BACKWARD_FLOP_FACTOR if training else 1
    tokens_scale = best.microbatch_size * choice.num_microbatches / traced_batch(traced)
    flops = factor * traced.analysis.total_flops * tokens_scale * layout.dp
    pipeline_work = choice.step_s - choice.bubble_s
    comm = min(pipeline_work, comm_per_mb * choice.num_microbatches / layout.pp) + best.dp_sync_s
    cost = Cost(
        step_time_s=best.step_s, compute_s=best.step_s - comm - choice.bubble_s, comm_s=comm,
        bubble_s=choice.bubble_s, memory_per_device_bytes=choice.memory_bytes,
        tflops_per_device=flops / best.step_s / mesh.world_size / 1e12,
        optimizer_s=best.optimizer_s, dp_sync_s=best.dp_sync_s,
    )  # fmt: skip
    unit_of = unit_of_nodes(traced)
    layer_of = {n: i.layer for n, i in traced.analysis.nodes.items() if i.layer is not None}
    result = solution.result
    return Plan(
        dp=layout.dp, tp=layout.tp, pp=layout.pp, num_microbatches=choice.num_microbatches,
        microbatch_size=best.microbatch_size, schedule=choice.schedule,
        strategies=_strategies_text(traced, result.strategies),
        stages=_stages(traced, best, unit_of), cost=cost,
        collectives=solution.pricing.collectives, unsupported_ops=solution.strategies.unsupported,
        model_fingerprint=traced.fingerprint(),
        mesh={**mesh.to_dict(), "description": mesh.describe()},
        mesh_fingerprint=mesh.fingerprint(),
        solver={"status": result.status, "solve_time_s": result.solve_time_s,
                "num_variables": result.num_variables, "num_constraints": result.num_constraints},
        layer_of=layer_of, param_fqns=dict(traced.param_fqns),
        tied_params=_unused_twins(traced), unit_times_s={u.name: u.time_s for u in best.units},
    )  # fmt: skip


def _unused_twins(traced) -> dict[str, str]:
    """Tied parameters: the placeholder the graph never reads -> the one it reads."""
    read = {n.name for n in traced.graph_module.graph.nodes if n.op == "placeholder" and n.users}
    return {
        (first if duplicate in read else duplicate): (duplicate if duplicate in read else first)
        for duplicate, first in traced.tied_params.items()
    }


def traced_batch(traced) -> int:
    """The batch size (dim 0 of the first user input) the model was traced with."""
    for node in traced.graph_module.graph.nodes:
        if node.name in traced.user_inputs:
            shape = node.meta["val"].shape
            return int(shape[0]) if len(shape) else 1
    return 1
