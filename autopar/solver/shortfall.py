"""When no plan fits: the least memory any layout needs, and how many nodes would hold it.

Both are read off the fastest sharding of each tp degree the search solved, split into
stages by the stage DP (`pipeline.evaluate`), each layout in its most frugal
configuration (the caller's `options`: most microbatches, 1F1B, the highest ZeRO
stage, full recomputation where the pins allow): first with no memory bound on this
mesh (the least memory a layout needs per device), then under the device's memory on
meshes of more nodes, until one fits. The memory-bounded ILP may shave a little off the
first figure; it could not bring it under the device's memory, or the search would have
found a plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from autopar.cost.memory import RECOMPUTE_MODES, state_bytes_per_param
from autopar.errors import AutoparError
from autopar.plan.summary import human_bytes
from autopar.solver.pipeline import evaluate

MAX_NODES = 4096  # where the search for a mesh that fits gives up
ZERO_DP = 64  # where ZeRO's 1/dp of the states stops mattering to "how many nodes would fit"


@dataclass(frozen=True)
class Need:
    """A layout and pipeline configuration, and the memory per device it needs."""

    layout: object  # search.Layout
    num_microbatches: int
    microbatch_size: int
    schedule: str
    zero: int
    recompute: str  # the stages' recomputation mode
    memory_bytes: float

    def describe(self) -> str:
        layout = self.layout
        zero = f", ZeRO-{self.zero}" if self.zero else ""
        recompute = f", {self.recompute} recomputation" if self.recompute != "none" else ""
        return (
            f"dp={layout.dp} tp={layout.tp} pp={layout.pp}, {self.num_microbatches} "
            f"microbatch(es) of {self.microbatch_size}, {self.schedule}{zero}{recompute}"
        )


Options = Callable[[object], Iterable[tuple[int, int, str, int]]]  # layout -> (m, size,
# schedule, ZeRO stage); (layout, size, ZeRO stage) -> units, None where tp was not solved
UnitsOf = Callable[[object, int, int], list | dict | None]


def least_need(layouts, options: Options, units_of: UnitsOf, budget=math.inf, memo=None):
    """The configuration needing the least memory per device among those within `budget`
    (a Need, or None). Memory depends on dp only under ZeRO: `memo` keeps each split's."""
    best, memo = None, {} if memo is None else memo
    for layout in layouts:
        for m, size, schedule, zero in options(layout):
            key = (layout.tp, layout.pp, layout.dp if zero else 1, m, size, schedule, zero)
            if key not in memo:
                units = units_of(layout, size, zero)
                choice = units and evaluate(units, layout.pp, m, schedule, lambda b: 0.0, budget)
                memo[key] = choice and (choice.memory_bytes, _mode(choice.split.modes))
            if memo[key] and (best is None or memo[key][0] < best.memory_bytes):
                best = Need(layout, m, size, schedule, zero, memo[key][1], memo[key][0])
    return best


def _mode(modes: tuple[str, ...]) -> str:
    return modes[0] if len(set(modes)) == 1 else "mixed"


def nodes_that_fit(mesh, layouts_of, options: Options, units_of: UnitsOf, max_nodes: int):
    """(nodes, Need) for the smallest mesh of up to `max_nodes` on which some layout fits,
    or None. `layouts_of(mesh)` lists a mesh's layouts (AutoparError if the pins rule
    every one out). The largest mesh is tried first (it has the most stages and replicas
    to spread memory over): if even it holds no plan, the search stops there."""
    memo, largest = {}, min(max_nodes, MAX_NODES)
    if largest <= mesh.nodes or not _need_on(mesh, largest, layouts_of, options, units_of, memo):
        return None
    for nodes in range(mesh.nodes + 1, largest + 1):
        need = _need_on(mesh, nodes, layouts_of, options, units_of, memo)
        if need is not None:
            return nodes, need
    raise AssertionError("the largest mesh fits, so the search ends there")


def _need_on(mesh, nodes, layouts_of, options, units_of, memo) -> Need | None:
    """The least memory a layout of `nodes` nodes needs, when within the device's."""
    try:
        layouts = layouts_of(dataclasses.replace(mesh, nodes=nodes))
    except AutoparError:
        return None
    return least_need(layouts, options, units_of, mesh.device.memory_bytes, memo)


def explain(mesh, least: Need, bigger, max_nodes: int) -> str:
    """One line: what the least-memory layout needs, and what mesh would hold a plan."""
    text = (
        f"no plan fits in {human_bytes(mesh.device.memory_bytes)} per device on "
        f"{mesh.world_size} devices: the layout needing the least memory ({least.describe()}) "
        f"needs {human_bytes(least.memory_bytes)} per device"
    )
    if bigger is None:
        return text + (
            f"; no mesh of up to {min(max_nodes, MAX_NODES)} nodes holds a plan either (past "
            "that, more nodes only add replicas): use a smaller batch or sequence, fewer pins "
            "or devices with more memory"
        )
    nodes, need = bigger
    world = nodes * mesh.devices_per_node
    return text + (
        f"; {nodes} nodes ({world} devices) would hold a plan: {need.describe()} needs "
        f"{human_bytes(need.memory_bytes)} per device there"
    )


def nothing_fits(run, options: Options, layouts_of, global_batch_size) -> str:
    """The search's error when no configuration fit: the least memory a layout of this
    mesh needs and the nodes that would hold a plan, or the ILP's own reasons. `run` is
    the search (`search._Search`: its mesh, pins, solver and unit totals)."""
    mesh, pins, units_of = run.mesh, run.pins, _fastest_units(run)
    least = least_need(layouts_of(mesh), options, units_of)
    if least is not None and least.memory_bytes > mesh.device.memory_bytes:
        # past tp x pp = tp x units, more devices only add replicas: useless past one row
        # each, and past ZERO_DP for the states ZeRO divides among them
        useful = max(pins.tp or 1, mesh.devices_per_node) * (len(run.traced.analysis.layers) + 2)
        replicas = max(global_batch_size or 1, ZERO_DP if run.training and pins.zero != 0 else 1)
        max_nodes = -(-useful * replicas // mesh.devices_per_node)
        bigger = nodes_that_fit(mesh, layouts_of, options, units_of, max_nodes)
        return explain(mesh, least, bigger, max_nodes)
    pinned = ", ".join(f"{k}={v}" for k, v in pins.__dict__.items() if v is not None)
    return (
        f"no plan fits in {human_bytes(mesh.device.memory_bytes)} per device with "
        f"{pinned or 'no pins'}; use more devices, allow a larger pp, more microbatches or a "
        "smaller batch" + "".join(f"; {f}" for f in run.solve.failures)
    )


def _fastest_units(run) -> UnitsOf:
    """(layout, microbatch size, ZeRO stage) -> the units of the fastest sharding solved at
    the layout's tp (None if none was), recomputed as fully as the pins allow."""
    fastest = {k[0]: s for k, s in run.solve.solutions.items() if s is not None and not k[2]}
    frugal = (run.pins.recompute or RECOMPUTE_MODES[-1],)  # "full" keeps the least

    def units_of(layout, size: int, zero: int):
        if layout.tp not in fastest:
            return None
        state = state_bytes_per_param(run.training, run.dtype_bytes, run.optimizer, zero, layout.dp)
        return run._totals(fastest[layout.tp]).units(size / run.batch, state, frugal)

    return units_of
