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

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import torch

from autopar.cost.memory import RECOMPUTE_MODES, state_bytes_per_param
from autopar.errors import AutoparError, PlanError
from autopar.placement import TP
from autopar.plan import Plan
from autopar.solver import shortfall
from autopar.solver.assemble import to_plan
from autopar.solver.pipeline import SCHEDULES, evaluate, schedulable, unit_modes, unit_of_nodes
from autopar.solver.sharding import ShardingSolver, grad_sync_seconds

ZERO_DP = 64  # where ZeRO's 1/dp of the states stops mattering to "how many nodes would fit"
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
    sequence_parallel: bool | None = None
    recompute: str | None = None  # "none", "selective" or "full"
    zero: int | None = None  # ZeRO stage over dp: 0, 1 or 2


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


def _microbatch_options(replica_batch: int, pins: Pins) -> list[tuple[int, int]]:
    """(microbatches, microbatch size) pairs that split one replica's batch evenly (with
    one stage, more microbatches is gradient accumulation: slower, but less memory)."""
    options = []
    for m in _divisors(replica_batch):
        size = replica_batch // m
        if m > MAX_MICROBATCHES or pins.microbatches not in (None, m):
            continue
        if pins.microbatch_size not in (None, size):
            continue
        options.append((m, size))
    return options


def _p2p(mesh, layout: Layout):
    if layout.pp == 1:
        return lambda nbytes: 0.0
    neighbours = (0, layout.dp * layout.tp)  # pp is the outermost mesh axis
    # forward activation and backward gradient cross each boundary once per microbatch
    return lambda nbytes: 2 * mesh.collective_time("send_recv", nbytes, neighbours)


@dataclass
class _Candidate:
    layout: Layout
    choice: object
    microbatch_size: int
    step_s: float
    optimizer_s: float
    dp_sync_s: float
    grad_bytes: float  # the fullest pipeline rank's gradients, synced over dp
    tp_sync_s: float  # parameter gradients summed over tp once per step (deferred f)
    tp_sync_bytes: float
    sharding: object  # the intra-op solution it runs (sharding.Sharding)
    unit_times_s: dict[str, float]  # per microbatch, forward and backward
    zero: int  # the ZeRO stage over dp

    @property
    def seconds_per_sample(self) -> float:
        """What the search minimizes: without a pinned global batch, dp changes how many
        samples a step processes, so steps are compared per sample."""
        samples = self.layout.dp * self.choice.num_microbatches * self.microbatch_size
        return self.step_s / samples


def _schedules(layout: Layout, pins: Pins) -> list[str]:
    if pins.schedule:
        return [pins.schedule]
    return ["gpipe"] if layout.pp == 1 else list(SCHEDULES)  # one stage: accumulation


def _zero_stages(layout: Layout, pins: Pins, training: bool) -> list[int]:
    """ZeRO stages worth pricing: only data parallelism has states to shard."""
    if layout.dp == 1 or not training:
        return [0]
    return [pins.zero] if pins.zero is not None else [0, 1, 2]


def _candidates_for(traced, mesh, solve, fastest, layout, pins, replica_batch, context):
    """Every (microbatches, schedule, ZeRO stage) that fits: on the fastest sharding, else
    on one the ILP solved under this configuration's memory rows."""
    training, dtype_bytes, batch, unit_of, optimizer = context
    p2p, budget = _p2p(mesh, layout), mesh.device.memory_bytes
    num_units = len(traced.analysis.layers) + 2
    modes = (pins.recompute,) if pins.recompute else RECOMPUTE_MODES

    def units_of(sharding, size, zero):
        state = state_bytes_per_param(training, dtype_bytes, optimizer, zero, layout.dp)
        return unit_modes(
            traced, sharding.pricing, unit_of, scale=size / batch,
            state_bytes_per_param=state, modes=modes,
        )  # fmt: skip

    for m, size in _microbatch_options(replica_batch, pins):
        for zero in _zero_stages(layout, pins, training):
            units = units_of(fastest, size, zero)
            for schedule in _schedules(layout, pins):
                if not schedulable(num_units, layout.pp, m, schedule):
                    continue
                sharding, used = fastest, units
                choice = evaluate(used, layout.pp, m, schedule, p2p, budget)
                if choice is None:
                    sharding = solve.fitting(layout, m, size / batch, schedule, unit_of)
                    if sharding is None:
                        continue
                    used = units_of(sharding, size, zero)
                    choice = evaluate(used, layout.pp, m, schedule, p2p, budget)
                if choice is not None:
                    yield _finish(mesh, sharding, layout, choice, size, unit_of, training,
                                  used, zero)  # fmt: skip


def _per_rank(values: dict, choice, unit_of, pp: int) -> list[float]:
    """Sum `values` (node name -> amount) per pipeline rank, by the stage of each node."""
    sums = [0.0] * pp
    for name, amount in values.items():
        stage = _stage_of_unit(choice.split, unit_of.get(name, 0))
        sums[choice.rank_of_stage[stage]] += amount
    return sums


def _finish(mesh, solution, layout, choice, size, unit_of, training, units, zero):
    params = {n: p for n, p in solution.pricing.nodes.items() if p.param_numel}
    owned = layout.dp if zero >= 1 else 1  # ZeRO: each dp rank steps its slice
    optimizer = _per_rank(
        {n: p.optimizer_s / owned for n, p in params.items()}, choice, unit_of, layout.pp
    )
    grads = _per_rank({n: p.param_bytes for n, p in params.items()}, choice, unit_of, layout.pp)
    partial = _per_rank(solution.pricing.deferred_grad_bytes, choice, unit_of, layout.pp)
    dp_sync = grad_sync_seconds(mesh, layout, max(grads), zero=zero) if training else 0.0
    tp_sync = max(grad_sync_seconds(mesh, layout, b, TP) for b in partial)
    step = choice.step_s + max(optimizer) + dp_sync + tp_sync
    return _Candidate(layout, choice, size, step, max(optimizer), dp_sync, max(grads),
                      tp_sync, max(partial), solution, _unit_times(choice.split, units),
                      zero)  # fmt: skip


def _unit_times(split, units: dict) -> dict[str, float]:
    """Each unit's time per microbatch under its stage's recomputation mode."""
    return {
        unit.name: unit.time_s
        for (i, j), mode in zip(split.bounds, split.modes, strict=True)
        for unit in units[mode][i:j]
    }


def _stage_of_unit(split, unit: int) -> int:
    return next(k for k, (i, j) in enumerate(split.bounds) if i <= unit < j)


def search(traced, mesh, *, pins: Pins | None = None, training=True, dtype_bytes=None,
           optimizer="adam", time_limit_s=None, batch=1, global_batch_size=None,
           progress=None, input_roles=None) -> Plan:  # fmt: skip
    """The cheapest plan over everything the pins allow that fits in memory."""
    start = time.perf_counter()
    pins = pins or Pins()
    pins = Pins(**{**pins.__dict__, "schedule": normalize_schedule(pins.schedule)})
    candidates = layouts(traced, mesh, pins)
    _check_batch_splits(candidates, pins, batch, global_batch_size)
    dtype_bytes = dtype_bytes or mesh.device.dtype_bytes
    unit_of = unit_of_nodes(traced)
    state_bytes = state_bytes_per_param(training, dtype_bytes, optimizer)
    context = (training, dtype_bytes, batch, unit_of, optimizer)
    solve = ShardingSolver(traced, mesh, training, dtype_bytes, state_bytes, time_limit_s,
                           pins.sequence_parallel, input_roles)  # fmt: skip
    best, tried = None, 0
    for layout in candidates:
        if progress:
            progress(layout)
        solution = solve(layout)
        replica_batch = _replica_batch(global_batch_size, batch, layout.dp)
        if solution is None or replica_batch is None:
            continue
        for candidate in _candidates_for(
            traced, mesh, solve, solution, layout, pins, replica_batch, context
        ):
            tried += 1
            if best is None or candidate.seconds_per_sample < best.seconds_per_sample:
                best = candidate
    if best is None:
        raise PlanError(_nothing_fits(traced, mesh, pins, solve, context, global_batch_size))
    plan = to_plan(traced, mesh, best.sharding, best, training)
    plan.solver.update(
        search_time_s=time.perf_counter() - start, layouts_tried=tried,
        layouts_searched=len(candidates), ilp_time_s=solve.ilp_time_s,
    )  # fmt: skip
    return plan


def _replica_batch(global_batch_size, batch, dp) -> int | None:
    if global_batch_size is None:
        return batch
    return global_batch_size // dp if global_batch_size % dp == 0 else None


def _check_batch_splits(candidates, pins: Pins, batch: int, global_batch_size) -> None:
    """Before the search: some layout's batch splits over dp and into the pinned
    microbatches, or an AutoparError saying which numbers do not divide."""
    replicas = {c.dp: _replica_batch(global_batch_size, batch, c.dp) for c in candidates}
    if all(rows is None for rows in replicas.values()):
        raise AutoparError(
            f"the global batch of {global_batch_size} rows does not split over dp = "
            f"{', '.join(map(str, sorted(replicas)))} replicas; pick a global batch one of "
            "them divides, or pin dp"
        )
    if any(_microbatch_options(replicas[c.dp] or 0, pins) for c in candidates):
        return
    pinned = [f"{pins.microbatches} microbatches"] if pins.microbatches else []
    pinned += [f"microbatches of {pins.microbatch_size}"] if pins.microbatch_size else []
    rows = sorted({r for r in replicas.values() if r is not None}, reverse=True)
    per_dp = ", ".join(f"{replicas[d]} at dp={d}" for d in sorted(replicas) if replicas[d])
    raise AutoparError(
        f"{rows[0] if len(rows) == 1 else 'the'} rows of one replica's batch"
        f"{'' if len(rows) == 1 else f' ({per_dp})'} do not split into {' of '.join(pinned)}; "
        f"pin a microbatch count that divides {rows[0]} (at most {MAX_MICROBATCHES}), or change "
        "the batch"
    )


def _frugal_options(pins: Pins, batch: int, global_batch_size, training: bool):
    """layout -> its configuration needing the least memory that the pins allow: the most
    microbatches, 1F1B (the fewest in flight) and the highest ZeRO stage."""

    def options(layout):
        replica = _replica_batch(global_batch_size, batch, layout.dp)
        splits = _microbatch_options(replica, pins) if replica else []
        if splits:
            schedules = _schedules(layout, pins)
            schedule = "1f1b" if "1f1b" in schedules else schedules[0]
            yield *max(splits), schedule, max(_zero_stages(layout, pins, training))

    return options


def _fastest_units(traced, solve, pins: Pins, context):
    """(layout, microbatch size, ZeRO stage) -> the units of the fastest sharding solved at
    the layout's tp (None if none was), recomputed as fully as the pins allow."""
    training, dtype_bytes, batch, unit_of, optimizer = context
    fastest = {key[0]: s for key, s in solve.solutions.items() if s is not None and not key[2]}
    frugal = (pins.recompute or RECOMPUTE_MODES[-1],)  # "full" keeps the least

    @functools.cache
    def per_parameter(tp: int, size: int) -> dict:  # param_bytes counts parameters here
        return unit_modes(traced, fastest[tp].pricing, unit_of, scale=size / batch,
                          state_bytes_per_param=1.0, modes=frugal)  # fmt: skip

    def units_of(layout, size: int, zero: int):
        if layout.tp not in fastest:
            return None
        state = state_bytes_per_param(training, dtype_bytes, optimizer, zero, layout.dp)
        return {
            mode: [dataclasses.replace(u, param_bytes=u.param_bytes * state) for u in units]
            for mode, units in per_parameter(layout.tp, size).items()
        }

    return units_of


def _nothing_fits(traced, mesh, pins, solve, context, global_batch_size) -> str:
    """The least memory a layout needs and the nodes that would fit it (or why not)."""
    options = _frugal_options(pins, context[2], global_batch_size, context[0])
    units_of = _fastest_units(traced, solve, pins, context)
    least = shortfall.least_need(layouts(traced, mesh, pins), options, units_of)
    if least is not None and least.memory_bytes > mesh.device.memory_bytes:
        # past tp x pp = tp x units, more devices only add replicas: useless past one row
        # each, and past ZERO_DP for the states ZeRO divides among them
        useful = max(pins.tp or 1, mesh.devices_per_node) * (len(traced.analysis.layers) + 2)
        replicas = max(global_batch_size or 1, ZERO_DP if context[0] and pins.zero != 0 else 1)
        max_nodes = -(-useful * replicas // mesh.devices_per_node)
        layouts_of = functools.partial(layouts, traced, pins=pins)
        bigger = shortfall.nodes_that_fit(mesh, layouts_of, options, units_of, max_nodes)
        return shortfall.explain(mesh, least, bigger, max_nodes)
    detail = "".join(f"; {f}" for f in solve.failures)
    return (
        f"no plan fits in {mesh.device.memory_bytes / 2**30:.0f} GiB per device with "
        f"{', '.join(f'{k}={v}' for k, v in pins.__dict__.items() if v is not None) or 'no pins'}; "
        "use more devices, allow a larger pp, more microbatches or a smaller batch" + detail
    )
