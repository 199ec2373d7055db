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

import functools
import math
import time
from dataclasses import dataclass, field

import torch

from autopar.cost.memory import RECOMPUTE_MODES, state_bytes_per_param
from autopar.cost.overheads import accumulation_seconds
from autopar.cost.sharing import shared_core_seconds
from autopar.errors import AutoparError, PlanError
from autopar.placement import TP
from autopar.plan import Plan
from autopar.solver import shortfall
from autopar.solver.assemble import to_plan
from autopar.solver.pipeline import (
    INTERLEAVED_CHUNKS,
    SCHEDULES,
    Gathered,
    UnitTotals,
    evaluate,
    schedulable,
    shared_params,
    tied_param_bytes,
    unit_name,
    unit_of_nodes,
)
from autopar.solver.sharding import (
    ShardingSolver,
    grad_sync_seconds,
    loss_mean_seconds,
    tied_grad_sync_seconds,
    zero3_gather_seconds,
)

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
    zero: int | None = None  # ZeRO stage over dp: 0, 1, 2 or 3


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
    """Seconds a stage boundary costs per microbatch: the forward activation and the
    backward gradient cross it once each. The alpha-beta time of the link between
    neighbouring stages (pp is the outermost mesh axis) is affine in the bytes, so it is
    read once per layout rather than per boundary the stage DP prices."""
    if layout.pp == 1:
        return lambda nbytes: 0.0
    neighbours = (0, layout.dp * layout.tp)
    latency = mesh.collective_time("send_recv", 0, neighbours)
    per_byte = mesh.collective_time("send_recv", 2**30, neighbours) / 2**30 - latency / 2**30
    return lambda nbytes: 2 * (latency + per_byte * nbytes)


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
    tied_sync_s: float = 0.0  # tied parameters' gradients summed over pp once per step
    tied_bytes: float = 0.0
    loss_mean_s: float = 0.0  # train_step's loss all-reduced over the world

    @property
    def seconds_per_sample(self) -> float:
        """What the search minimizes: without a pinned global batch, dp changes how many
        samples a step processes, so steps are compared per sample."""
        samples = self.layout.dp * self.choice.num_microbatches * self.microbatch_size
        return self.step_s / samples


def _schedules(layout: Layout, pins: Pins, m: int, num_units: float = math.inf) -> list[str]:
    """The schedules worth pricing for `m` microbatches: one stage is gradient
    accumulation; where 1F1B can run, it runs GPipe's timeline with at most as many
    microbatches in flight per stage, so GPipe (never faster, never smaller) is priced
    only when pinned or when 1F1B cannot run (fewer microbatches than stages)."""
    if pins.schedule:
        found = [pins.schedule]
    elif layout.pp == 1:
        found = ["gpipe"]
    else:
        found = list(SCHEDULES)
    found = [s for s in found if schedulable(num_units, layout.pp, m, s)]
    if not pins.schedule and "1f1b" in found:
        found.remove("gpipe")
    return found


def _zero_stages(layout: Layout, pins: Pins, training: bool) -> list[int]:
    """ZeRO stages worth pricing: only data parallelism has states to shard."""
    if layout.dp == 1 or not training:
        return [0]
    return [pins.zero] if pins.zero is not None else [0, 1, 2, 3]


@dataclass
class _Search:
    """One search's fixed inputs, its caches, and the best candidate found so far."""

    traced: object
    mesh: object
    pins: Pins
    solve: ShardingSolver
    training: bool
    dtype_bytes: int
    optimizer: str
    batch: int  # the traced example's rows
    unit_of: dict
    shared: dict  # parameters read by several units (pipeline.shared_params)
    best: _Candidate | None = None
    tried: int = 0
    totals: dict = field(default_factory=dict)  # id(sharding.pricing) -> UnitTotals
    gathers: dict = field(default_factory=dict)  # Layout -> Gathered (ZeRO-3)

    def _totals(self, sharding) -> UnitTotals:
        key = id(sharding.pricing)  # shardings that chose alike share one pricing
        if key not in self.totals:
            self.totals[key] = UnitTotals.of(self.traced, sharding.pricing, self.unit_of)
        return self.totals[key]

    def _units(self, sharding, layout, size, zero) -> dict:
        state = state_bytes_per_param(
            self.training, self.dtype_bytes, self.optimizer, zero, layout.dp
        )
        modes = (self.pins.recompute,) if self.pins.recompute else RECOMPUTE_MODES
        gathered = self._gathered(layout) if zero == 3 else None
        return self._totals(sharding).units(size / self.batch, state, modes, gathered)

    def _gathered(self, layout: Layout) -> Gathered:
        """ZeRO-3's per-unit costs on `layout`, each message size priced once."""
        if layout not in self.gathers:
            seconds = functools.partial(zero3_gather_seconds, self.mesh, layout)
            self.gathers[layout] = Gathered(self.dtype_bytes, functools.cache(seconds))
        return self.gathers[layout]

    def _hopeless(self, sharding, units: dict, layout, m: int, size: int, zero: int) -> bool:
        """Can this configuration not beat the best? A lower bound on its step: its units'
        time spread evenly over the pp ranks with the smallest pipeline bubble, plus the
        optimizer step and the gradient sync of an evenly split model."""
        if self.best is None:
            return False
        per_rank = sum(u.time_s for u in next(iter(units.values()))) / layout.pp
        critical = per_rank * (m + (layout.pp - 1) / INTERLEAVED_CHUNKS)
        pipeline = shared_core_seconds(critical, per_rank * m, self.mesh.idle_speedup)
        totals, owned = self._totals(sharding).values, layout.dp if zero >= 1 else 1
        optimizer = sum(totals["optimizer"]) / layout.pp / owned
        grads = sum(totals["grad_bytes"]) / layout.pp
        sync = grad_sync_seconds(self.mesh, layout, grads, zero=zero) if self.training else 0.0
        bound = pipeline + optimizer + sync
        return bound / (layout.dp * m * size) >= self.best.seconds_per_sample

    def visit(self, layout: Layout, replica_batch: int) -> None:
        """Price every (microbatches, ZeRO stage, schedule) of `layout` that fits: on the
        fastest sharding, else on one the ILP solved under this configuration's memory."""
        fastest = self.solve(layout)
        if fastest is None:
            return
        p2p, budget = _p2p(self.mesh, layout), self.mesh.device.memory_bytes
        num_units = len(self.traced.analysis.layers) + 2
        for m, size in _microbatch_options(replica_batch, self.pins):
            for zero in _zero_stages(layout, self.pins, self.training):
                units = self._units(fastest, layout, size, zero)
                if self._hopeless(fastest, units, layout, m, size, zero):
                    continue
                for schedule in _schedules(layout, self.pins, m, num_units):
                    self._price(layout, m, size, zero, schedule, fastest, units, p2p, budget)

    def _price(self, layout, m, size, zero, schedule, sharding, units, p2p, budget) -> None:
        speedup = self.mesh.idle_speedup
        choice = evaluate(units, layout.pp, m, schedule, p2p, budget, speedup)
        if choice is None:
            sharding = self.solve.fitting(layout, m, size / self.batch, schedule, self.unit_of)
            if sharding is None:
                return
            units = self._units(sharding, layout, size, zero)
            choice = evaluate(units, layout.pp, m, schedule, p2p, budget, speedup)
            if choice is None:
                return
        candidate = self._finish(sharding, layout, choice, size, units, zero)
        self.tried += 1
        if self.best is None or candidate.seconds_per_sample < self.best.seconds_per_sample:
            self.best = candidate

    def _finish(self, sharding, layout, choice, size, units, zero) -> _Candidate:
        totals, mesh = self._totals(sharding), self.mesh
        owned = layout.dp if zero >= 1 else 1  # ZeRO: each dp rank steps its slice
        optimizer = max(totals.per_rank("optimizer", choice)) / owned
        grads = max(totals.per_rank("grad_bytes", choice))
        partial = max(totals.per_rank("partial_bytes", choice))
        dp_sync = grad_sync_seconds(mesh, layout, grads, zero=zero) if self.training else 0.0
        tp_sync = grad_sync_seconds(mesh, layout, partial, TP)
        numel = max(totals.per_rank("param_numel", choice)) if self.training else 0.0
        accumulate = accumulation_seconds(numel, choice.num_microbatches, mesh.device,
                                          self.dtype_bytes)  # fmt: skip
        tied = tied_param_bytes(self.shared, sharding.pricing, choice)
        tied_sync = tied_grad_sync_seconds(mesh, layout, tied) if self.training else 0.0
        loss_mean = loss_mean_seconds(mesh, self.training)
        step = choice.step_s + accumulate + optimizer + dp_sync + tp_sync + tied_sync + loss_mean
        return _Candidate(layout, choice, size, step, optimizer, dp_sync, grads, tp_sync,
                          partial, sharding, _unit_times(choice.split, units), zero,
                          tied_sync, tied, loss_mean)  # fmt: skip


def _unit_times(split, units: dict) -> dict[str, float]:
    """Each unit's time per microbatch under its stage's recomputation mode."""
    count = len(next(iter(units.values())))
    return {
        unit_name(u, count): units[mode][u].time_s
        for (i, j), mode in zip(split.bounds, split.modes, strict=True)
        for u in range(i, j)
    }


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
    state_bytes = state_bytes_per_param(training, dtype_bytes, optimizer)
    solve = ShardingSolver(traced, mesh, training, dtype_bytes, state_bytes, time_limit_s,
                           pins.sequence_parallel, input_roles)  # fmt: skip
    unit_of = unit_of_nodes(traced)
    run = _Search(traced, mesh, pins, solve, training, dtype_bytes, optimizer, batch, unit_of,
                  shared_params(traced, unit_of))  # fmt: skip
    for layout in candidates:
        if progress:
            progress(layout)
        replica_batch = _replica_batch(global_batch_size, batch, layout.dp)
        if replica_batch is not None:
            run.visit(layout, replica_batch)
    if run.best is None:
        raise PlanError(_nothing_fits(run, global_batch_size))
    plan = to_plan(traced, mesh, run.best.sharding, run.best, training)
    plan.solver.update(
        search_time_s=time.perf_counter() - start, layouts_tried=run.tried,
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
            m, size = max(splits)
            schedules = _schedules(layout, pins, m) or [pins.schedule or "gpipe"]
            schedule = "1f1b" if "1f1b" in schedules else schedules[0]
            yield m, size, schedule, max(_zero_stages(layout, pins, training))

    return options


def _nothing_fits(run: _Search, global_batch_size) -> str:
    """Why no plan fits (solver/shortfall.py), each layout in its most frugal configuration."""
    options = _frugal_options(run.pins, run.batch, global_batch_size, run.training)
    layouts_of = functools.partial(layouts, run.traced, pins=run.pins)
    return shortfall.nothing_fits(run, options, layouts_of, global_batch_size)
