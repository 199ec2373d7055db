"""From a tensor-parallel choice to pipeline units, stage splits and schedule step times.

Units are the prologue (embeddings, masks), each transformer block, and the
epilogue (final norm, head): the only places a stage boundary may fall. Unit costs
are priced once per tp degree on the traced example batch and scaled linearly to
the microbatch size; parameter state does not scale.

Step time of one data-parallel replica with m microbatches and pp stages (t the
slowest stage's forward+backward per microbatch):
    GPipe, 1F1B:           (m + pp - 1) * t
    interleaved 1F1B (v):  m * t_rank + (pp - 1) * t_chunk,  t_rank = v chunks of one rank
On ranks sharing cores the bubble is partly filled (cost/sharing.py).
Microbatches alive on stage k (its activation memory): GPipe keeps all m; 1F1B keeps
pp - k (Narayanan et al. 2021); interleaved adds about (pp - 1) / v warm-up ones; with
one stage (gradient accumulation) one. `memory_rows` writes the same budget as rows of
the intra-op ILP, so that what the ILP accepts fits.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pulp
import torch.fx as fx

from autopar.codegen.stages import derived_nodes
from autopar.cost.sharing import shared_core_seconds
from autopar.solver.stages import StageSplit, Unit, best_split, equal_bounds

SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b")
INTERLEAVED_CHUNKS = 2  # model chunks per rank under interleaving


@dataclass(frozen=True)
class PipelineChoice:
    schedule: str
    num_microbatches: int
    split: StageSplit
    step_s: float  # the pipeline's forward and backward over all microbatches
    bubble_s: float
    memory_bytes: float  # the fullest rank
    rank_of_stage: tuple[int, ...]
    p2p_s: float = 0.0  # the sends and receives in step_s: the slowest rank's, m times


def unit_of_nodes(traced) -> dict[str, int]:
    """Node name -> unit: 0 prologue, 1..L the blocks, L + 1 epilogue."""
    analysis = traced.analysis
    num_layers = len(analysis.layers)
    units, seen_block = {}, False
    for node in traced.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        layer = analysis.nodes[node.name].layer
        seen_block = seen_block or layer is not None
        units[node.name] = layer + 1 if layer is not None else (num_layers + 1 if seen_block else 0)
    for node in traced.graph_module.graph.nodes:
        if node.op == "placeholder":
            users = [units[u.name] for u in node.users if u.name in units]
            units[node.name] = min(users) if users else 0
    return units


def _identical_units(values: dict[str, list[float]], crossing: list[float], at_scale: dict):
    """(kind of each unit, first unit of each kind): units with equal totals, equal bytes
    crossing into and out of them, the same place (prologue, block, epilogue) and no cost
    priced at each scale (the loss's unit is its own kind)."""
    count, seen, kinds, representatives = len(crossing), {}, [], []
    for u in range(count):
        place = 0 if u == 0 else 2 if u == count - 1 else 1
        key = (place, crossing[u - 1] if u else None, crossing[u], u if u in at_scale else None,
               *(amounts[u] for amounts in values.values()))  # fmt: skip
        if key not in seen:
            seen[key] = len(representatives)
            representatives.append(u)
        kinds.append(seen[key])
    return tuple(kinds), tuple(representatives)


def unit_name(u: int, count: int) -> str:
    """How plans name pipeline unit `u` of `count`."""
    return "prologue" if u == 0 else "epilogue" if u == count - 1 else f"block {u - 1}"


@functools.lru_cache(maxsize=8)
def _recomputed_names(graph: fx.Graph, user_inputs: tuple[str, ...]) -> frozenset[str]:
    """Nodes every stage computes for itself (never crossing a cut), once per graph."""
    inputs = {node for node in graph.nodes if node.name in set(user_inputs)}
    return frozenset(node.name for node in derived_nodes(graph, inputs))


def _crossing_bytes(traced, unit_of, num_units, pricing) -> list[float]:
    """This rank's bytes produced at or before unit u and read after it, per cut u | u+1."""
    crossing = [0.0] * num_units
    graph = traced.graph_module.graph
    recomputed = _recomputed_names(graph, tuple(traced.user_inputs))
    for node in graph.nodes:
        if node.op != "call_function" or node.name in recomputed:
            continue
        last_reader = max((unit_of.get(u.name, num_units - 1) for u in node.users), default=0)
        for cut in range(unit_of[node.name], min(last_reader, num_units - 1)):
            crossing[cut] += pricing.nodes[node.name].output_bytes
    return crossing


_QUANTITIES = (
    "time", "forward", "core", "kept", "core_kept", "param_numel", "once", "once_forward",
    "optimizer", "grad_bytes", "partial_bytes", "overhead", "forward_overhead", "core_overhead",
)  # fmt: skip


@dataclass(frozen=True)
class Gathered:
    """ZeRO-3's per-unit costs: bytes of a gathered parameter, and the seconds per
    microbatch of gathering (twice) and reduce-scattering a unit's `nbytes`."""

    bytes_per_param: float
    seconds: Callable[[float], float]


@dataclass(frozen=True)
class UnitTotals:
    """One sharding's costs per pipeline unit for one traced batch, summed once and then
    scaled for every configuration the search prices (`once`: collectives on parameters,
    and `overhead`: each node's fixed cost and each collective's latency, neither of
    which grows with the microbatch;
    `partial_bytes`: gradients summed over tp once per step)."""

    values: dict[str, list[float]]
    crossing: list[float]
    kinds: tuple[int, ...] = ()  # per unit, its kind: units of one kind are identical
    representatives: tuple[int, ...] = ()  # per kind, its first unit
    # unit -> the seconds of its costs not linear in the microbatch (NodePrice.at_scale)
    at_scale: dict[int, list[Callable[[float], float]]] = field(default_factory=dict)

    @classmethod
    def of(cls, traced, pricing, unit_of) -> UnitTotals:
        num_units = len(traced.analysis.layers) + 2
        values = {key: [0.0] * num_units for key in _QUANTITIES}
        placed = [(unit_of.get(name, 0), price) for name, price in pricing.nodes.items()]
        if pricing.untraced_loss is not None:  # on the output: the epilogue's rank
            placed.append((num_units - 1, pricing.untraced_loss))
        at_scale: dict[int, list] = defaultdict(list)
        for u, price in placed:
            if price.at_scale is not None:  # priced at each microbatch's own size
                at_scale[u].append(price.at_scale)
            linear = price.compute_s if price.at_scale is None else 0.0
            for key, amount in (
                ("time", linear), ("forward", price.forward_s),
                ("kept", price.activation_bytes), ("param_numel", price.param_numel),
                ("optimizer", price.optimizer_s), ("grad_bytes", price.param_bytes),
                ("overhead", price.overhead_s), ("forward_overhead", price.forward_overhead_s),
            ):  # fmt: skip
                values[key][u] += amount
            if price.attention_core:
                values["core"][u] += price.forward_s
                values["core_kept"][u] += price.activation_bytes
                values["core_overhead"][u] += price.forward_overhead_s
        for name, nbytes in pricing.deferred_grad_bytes.items():
            values["partial_bytes"][unit_of.get(name, 0)] += nbytes
        param_names = set(traced.param_fqns)
        for c in pricing.collectives:
            u, once = unit_of.get(c.producer, 0), c.producer in param_names
            # a collective on activations: its bytes scale with the microbatch, its
            # latency is paid once per microbatch, as a node's fixed overhead is
            scaled, fixed = (0.0, c.seconds) if once else (c.seconds - c.latency_s, c.latency_s)
            values["time"][u] += scaled
            values["once" if once else "overhead"][u] += fixed
            if c.phase == "forward":  # a recomputed forward runs them again
                values["forward"][u] += scaled
                values["once_forward" if once else "forward_overhead"][u] += fixed
        crossing = _crossing_bytes(traced, unit_of, num_units, pricing)
        kinds = _identical_units(values, crossing, at_scale)
        return cls(values, crossing, *kinds, at_scale=dict(at_scale))

    def _unit(self, u: int, mode: str, scale: float, state_bytes: float, gathered) -> Unit:
        """Unit `u` under recomputation `mode` (the prologue and epilogue never recompute)."""
        v, crossing = self.values, self.crossing
        time = scale * v["time"][u] + v["once"][u] + v["overhead"][u]
        time += sum(seconds(scale) for seconds in self.at_scale.get(u, ()))
        kept, transient = scale * v["kept"][u], 0.0
        block = 0 < u < len(crossing) - 1
        if mode == "selective" and block:
            time += scale * v["core"][u] + v["core_overhead"][u]
            kept -= scale * v["core_kept"][u]
        elif mode == "full" and block:
            time += scale * v["forward"][u] + v["once_forward"][u] + v["forward_overhead"][u]
            kept, transient = scale * crossing[u - 1], kept
        params = v["param_numel"][u] * state_bytes
        if gathered is not None:  # ZeRO-3: its parameters whole while it runs
            full = v["param_numel"][u] * gathered.bytes_per_param
            time, transient = time + gathered.seconds(full), transient + full
        name = "prologue" if u == 0 else "epilogue" if u == len(crossing) - 1 else "block"
        return Unit(name, time, params, kept, scale * crossing[u], transient)

    def units(
        self, scale: float, state_bytes: float, modes=("none",), gathered: Gathered | None = None
    ) -> dict[str, list[Unit]]:
        """The units under each recomputation mode, for a microbatch `scale` times the
        traced batch and `state_bytes` per parameter. Only blocks recompute: `selective`
        runs the attention core's forward again and drops what only it keeps; `full` runs
        the whole block's forward again (its in-graph collectives too) and keeps only the
        block's input, plus its activations while its backward runs. `gathered` (ZeRO-3):
        each unit gathers its parameters per microbatch and holds them while it runs."""
        found = {}
        for m in modes:  # identical blocks share one Unit: each kind is priced once
            priced = [self._unit(u, m, scale, state_bytes, gathered) for u in self.representatives]
            found[m] = [priced[kind] for kind in self.kinds]
        return found

    def per_rank(self, key: str, choice) -> list[float]:
        """`key` summed over the units of each pipeline rank's stages."""
        sums = [0.0] * (max(choice.rank_of_stage) + 1)
        for (i, j), rank in zip(choice.split.bounds, choice.rank_of_stage, strict=True):
            sums[rank] += sum(self.values[key][i:j])
        return sums


def shared_params(traced, unit_of) -> dict[str, frozenset[int]]:
    """The parameters read by more than one unit (a tied embedding and LM head), with
    the units that read them: found once per graph, as no split changes them."""
    found = {}
    for node in traced.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in traced.param_fqns:
            units = frozenset(unit_of[u.name] for u in node.users if u.name in unit_of)
            if len(units) > 1:
                found[node.name] = units
    return found


def tied_param_bytes(shared: dict[str, frozenset[int]], pricing, choice) -> float:
    """This rank's bytes of the `shared_params` whose readers run on more than one pp
    rank under `choice` (a tied embedding and LM head on the first and last stage)."""
    rank_of_unit = {
        u: rank
        for (i, j), rank in zip(choice.split.bounds, choice.rank_of_stage, strict=True)
        for u in range(i, j)
    }
    return sum(
        pricing.nodes[name].param_bytes
        for name, units in shared.items()
        if len({rank_of_unit[u] for u in units}) > 1
    )


def build_units(traced, pricing, unit_of, *, scale, state_bytes_per_param) -> list[Unit]:
    """The units of one sharding without recomputation."""
    return UnitTotals.of(traced, pricing, unit_of).units(scale, state_bytes_per_param)["none"]


def in_flight(schedule: str, pp: int, m: int, chunks: int):
    """Microbatches whose activations stage k keeps alive, as a function of k. Without a
    pipeline every schedule is gradient accumulation: one microbatch at a time."""
    if pp == 1:
        return lambda k: 1
    if schedule == "gpipe":
        return lambda k: m
    warmup = math.ceil((pp - 1) / chunks) if chunks > 1 else 0
    return lambda k: min(m, pp - k % pp + warmup)


def _chunks(schedule: str) -> int:
    return INTERLEAVED_CHUNKS if schedule == "interleaved1f1b" else 1


def schedulable(num_units: int, pp: int, m: int, schedule: str) -> bool:
    """Can `schedule` run `m` microbatches over pp ranks of these units at all?"""
    chunks = _chunks(schedule)
    if schedule == "1f1b" and pp > 1 and m < pp:
        return False  # its warm-up fills every stage first (torch's Schedule1F1B refuses)
    return pp * chunks <= num_units and not (chunks > 1 and (pp == 1 or m % pp))


def memory_rows(units_memory, pp, m, schedule, scale, budget) -> tuple[list, bool]:
    """The ILP's memory rows for this pipeline: per pp rank, the state of its units and
    `scale` times their activations for each microbatch in flight, on the equal split,
    each <= `budget`; and whether the least memory any choice could use fits at all."""
    chunks = _chunks(schedule)
    alive = in_flight(schedule, pp, m, chunks)
    weights = [defaultdict(lambda: [0.0, 0.0]) for _ in range(pp)]  # per rank, per unit
    distinct, least = {}, [0.0] * pp
    for k, (i, j) in enumerate(equal_bounds(len(units_memory), pp * chunks)):
        for unit in units_memory[i:j]:  # identical blocks share one UnitMemory
            weight = weights[k % pp][id(unit)]
            weight[0] += 1
            weight[1] += alive(k) * scale
            distinct[id(unit)] = unit
            least[k % pp] += unit.least_params + alive(k) * scale * unit.least_activations
    rows = [
        pulp.lpSum(a * distinct[u].params + b * distinct[u].activations
                   for u, (a, b) in rank.items())
        for rank in weights
    ]  # fmt: skip
    named = [(f"pp_rank_{r}", row, budget) for r, row in enumerate(rows)]
    return named, max(least) <= budget


def evaluate(units, pp, m, schedule, p2p, budget, idle_speedup=1.0) -> PipelineChoice | None:
    """Best split of `units` (a list, or recomputation mode -> units) for this schedule,
    each stage in the fastest mode that fits; None if no split fits in memory. Ranks that
    share cores (`idle_speedup` > 1) fill each other's bubbles (cost/sharing.py)."""
    chunks = _chunks(schedule)
    num_stages = pp * chunks
    count = len(next(iter(units.values()))) if isinstance(units, dict) else len(units)
    if not schedulable(count, pp, m, schedule):
        return None
    try:
        split = best_split(units, num_stages, p2p, in_flight(schedule, pp, m, chunks), budget * 1.0)
    except ValueError:
        return None
    ranks = tuple(s % pp for s in range(num_stages))
    rank_time = [
        sum(t for t, r in zip(split.stage_times, ranks, strict=False) if r == rank)
        for rank in range(pp)
    ]
    rank_memory = [
        sum(b for b, r in zip(split.stage_memory, ranks, strict=False) if r == rank)
        for rank in range(pp)
    ]
    if max(rank_memory) > budget:
        return None
    critical = m * max(rank_time) + (pp - 1) * split.slowest_s
    step = shared_core_seconds(critical, m * sum(rank_time) / pp, idle_speedup)
    bubble = max(step - m * max(rank_time), 0.0)
    slowest = rank_time.index(max(rank_time))
    p2p_s = m * sum(t for t, r in zip(split.stage_p2p, ranks, strict=True) if r == slowest)
    return PipelineChoice(schedule, m, split, step, bubble, max(rank_memory), ranks, p2p_s)
