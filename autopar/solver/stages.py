"""Inter-op: split the sequence of units (prologue, blocks, epilogue) into pipeline stages.

A dynamic program over contiguous splits, after Alpa's inter-op pass: with units
u_0..u_{U-1} (times t_u per microbatch, forward plus backward, at the chosen tensor
parallel sharding), stage k holding units [i, j) costs

    T(k, i, j) = sum_{u in [i, j)} t_u + p2p(boundary_bytes(i)) + p2p(boundary_bytes(j))

(receiving its input and sending its output, forward and backward). The DP picks the
split minimizing max_k T(k, i_k, j_k), subject to each stage's memory

    params(i, j) + in_flight(k) * activations(i, j) <= budget,

where in_flight(k) is how many microbatches the schedule keeps alive on stage k
(1F1B: pp - k; GPipe: all of them). It is exact: `best_split_brute_force` checks it
in the tests. Cuts fall only between units, where one hidden state (and the masks
the prologue made) crosses.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

INFEASIBLE = float("inf")


@dataclass(frozen=True)
class Unit:
    """A contiguous run of the graph no stage boundary may cut."""

    name: str
    time_s: float  # forward + backward of one microbatch (a recomputed forward included)
    param_bytes: float  # parameters, gradients and optimizer state
    activation_bytes: float  # kept for backward, one microbatch
    out_bytes: float  # what crosses to the next unit, one microbatch
    transient_bytes: float = 0.0  # held while its own backward runs (a recomputed block)


@dataclass(frozen=True)
class StageSplit:
    bounds: tuple[tuple[int, int], ...]  # [i, j) unit ranges, one per stage
    stage_times: tuple[float, ...]  # sends and receives included
    stage_memory: tuple[float, ...]
    modes: tuple[str, ...] = ()  # each stage's recomputation mode (the keys of the units)
    stage_p2p: tuple[float, ...] = ()  # the sends and receives in stage_times

    @property
    def slowest_s(self) -> float:
        return max(self.stage_times)


def _stage_p2p(units, i, j, p2p: Callable[[float], float]) -> float:
    inbound = p2p(units[i - 1].out_bytes) if i > 0 else 0.0
    outbound = p2p(units[j - 1].out_bytes) if j < len(units) else 0.0
    return inbound + outbound


def _stage_cost(units, i, j, p2p: Callable[[float], float]) -> float:
    return sum(u.time_s for u in units[i:j]) + _stage_p2p(units, i, j, p2p)


def _stage_memory(units, i, j, in_flight: float) -> float:
    kept = sum(u.param_bytes + in_flight * u.activation_bytes for u in units[i:j])
    return kept + max(u.transient_bytes for u in units[i:j])


def _band_sums(values: np.ndarray, width: int) -> np.ndarray:
    """band[r, j] = sum(values[i:j]) for i = j - width + r (stages of width - r units)."""
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    return prefix[None, :] - _band_of(prefix, width)


def _band_of(per_cut: np.ndarray, width: int) -> np.ndarray:
    """band[r, j] = per_cut[i] for i = j - width + r, per_cut[0] where i < 0 (masked later)."""
    padded = np.concatenate([np.full(width, per_cut[0]), per_cut])
    return sliding_window_view(padded, len(per_cut))[:width]


def _band_max(values: np.ndarray, width: int) -> np.ndarray:
    """band[r, j] = max(values[i:j]), grown one unit at a time from the shortest stages."""
    band = np.zeros((width, len(values) + 1))
    running = np.zeros(len(values) + 1)
    for length in range(1, width + 1):
        starts = np.arange(len(values) + 1) - length
        running = np.maximum(running, np.where(starts >= 0, values[np.maximum(starts, 0)], 0.0))
        band[width - length] = running
    return band


@dataclass(frozen=True)
class _Band:
    """One recomputation mode's stages of at most `width` units, indexed (r, j) for the
    stage [j - width + r, j): its time (sends and receives included) and memory parts."""

    cost: np.ndarray
    params: np.ndarray
    activations: np.ndarray
    transient: np.ndarray

    @classmethod
    def of(cls, units, p2p, width: int) -> _Band:
        # cut_after[c] prices the boundary after unit c - 1 (none before the first unit and
        # after the last): a stage [i, j) receives across cut i and sends across cut j
        cut_after = np.array([0.0, *(p2p(u.out_bytes) for u in units[:-1]), 0.0])
        inside = np.arange(len(units) + 1)[None, :] - width + np.arange(width)[:, None] >= 0
        time = _band_sums(np.array([u.time_s for u in units]), width)
        return cls(
            np.where(inside, time + _band_of(cut_after, width) + cut_after[None, :], INFEASIBLE),
            _band_sums(np.array([u.param_bytes for u in units]), width),
            _band_sums(np.array([u.activation_bytes for u in units]), width),
            _band_max(np.array([u.transient_bytes for u in units]), width),
        )


def _equal_split_bound(by_mode, num_stages, p2p, in_flight, budget) -> float:
    """The slowest stage of `equal_bounds`, each stage in its fastest mode that fits: a
    split the DP may beat but never lose to (+inf when a stage fits in no mode)."""
    size = len(next(iter(by_mode.values())))
    if size - 2 < num_stages:
        return INFEASIBLE
    slowest = 0.0
    for k, (i, j) in enumerate(equal_bounds(size, num_stages)):
        fitting = [
            _stage_cost(units, i, j, p2p) for units in by_mode.values()
            if _stage_memory(units, i, j, in_flight(k)) <= budget
        ]  # fmt: skip
        if not fitting:
            return INFEASIBLE
        slowest = max(slowest, min(fitting))
    return slowest


def _widest_stage(by_mode, bound: float) -> int:
    """The most units a stage costing at most `bound` can hold (its compute alone, sends
    and receives being non-negative, already bounds it)."""
    widest = 1
    for units in by_mode.values():
        prefix = np.concatenate([[0.0], np.cumsum([u.time_s for u in units])])
        ends = np.searchsorted(prefix, prefix + bound, side="right") - 1
        widest = max(widest, int((ends - np.arange(len(prefix))).max()))
    return widest


def _some_split_fits(by_mode, num_stages, in_flight, budget) -> bool:
    """Can a split fit the memory budget? False only if none does, in time linear in the
    units: a stage's memory only grows as it takes more units, so giving each stage, first
    to last, as many units as fit in its best mode (none, if none fits) reaches at least as
    far as every split that fits does, stage by stage. True leaves the answer to the DP."""
    modes = list(by_mode.values())
    size, start = len(modes[0]), 0
    if size < num_stages:
        return False  # every stage holds at least one unit
    for k in range(num_stages):
        if start == size:
            return True
        end, alive = start, in_flight(k)
        for units in modes:
            kept = transient = 0.0
            j = start
            while j < size:
                unit = units[j]
                kept += unit.param_bytes + alive * unit.activation_bytes
                transient = max(transient, unit.transient_bytes)
                if kept + transient > budget:
                    break
                j += 1
            end = max(end, j)
        start = end  # possibly no unit: a later stage (fewer in flight) may take it
    return start == size


def best_split(units, num_stages, p2p, in_flight: Callable[[int], float], budget) -> StageSplit:
    """Minimize the slowest stage under each stage's memory budget (ValueError if none fits).

    `units` is one list, or a dict mode -> list (same boundaries) of which each stage
    then takes the fastest mode that fits it. best[k][j] is the slowest stage of the best
    split of units [0, j) into k stages; best[k][j] = min_{i, mode} max(best[k-1][i],
    cost_mode[i, j]) over memory-feasible [i, j).

    Only stages no slower than the equal split's slowest can be in the answer, so the DP
    runs over stages at most `width` units long: a band of the (i, j) table, rows
    r = i - j + width, built in time linear in the units for a given width, whose argmin
    picks what the whole table's would.
    """
    by_mode = units if isinstance(units, dict) else {"none": units}
    size = len(next(iter(by_mode.values())))
    if not _some_split_fits(by_mode, num_stages, in_flight, budget):
        raise ValueError("no split fits the memory budget")
    bound = _equal_split_bound(by_mode, num_stages, p2p, in_flight, budget) * (1 + 1e-9)
    width = min(_widest_stage(by_mode, bound), size)
    best, choices = _banded_dp(by_mode, num_stages, p2p, in_flight, budget, width)
    if best > bound and width < size:  # rounding at the bound's edge: the whole table
        best, choices = _banded_dp(by_mode, num_stages, p2p, in_flight, budget, size)
    if best == INFEASIBLE:
        raise ValueError("no split fits the memory budget")
    return _traced_back(by_mode, choices, size, p2p, in_flight)


def _banded_dp(by_mode, num_stages, p2p, in_flight, budget, width):
    """The DP over stages of at most `width` units: the slowest stage of the best split and
    each step's choices (mode * (size + 1) + i for every end j)."""
    size = len(next(iter(by_mode.values())))
    bands = [_Band.of(us, p2p, width) for us in by_mode.values()]
    band_cost = np.stack([band.cost for band in bands])  # (mode, r, j)
    columns = np.arange(size + 1)
    fits = {}  # microbatches in flight -> band cost, +inf where the stage does not fit
    best = np.full(size + 1, INFEASIBLE)
    best[0] = 0.0
    choices = []
    for k in range(num_stages):
        alive = in_flight(k)  # a schedule has few distinct counts: each mask is made once
        if alive not in fits:
            memory = np.stack([b.params + alive * b.activations + b.transient for b in bands])
            fits[alive] = np.where(memory <= budget, band_cost, INFEASIBLE)
        before = _band_of(best, width)  # best[i] of each cell (cells with i < 0 cost +inf)
        flat = np.maximum(before[None], fits[alive]).reshape(-1, size + 1)
        choice = np.argmin(flat, axis=0)
        best = flat[choice, columns]
        mode, r = np.divmod(choice, width)
        choices.append(mode * (size + 1) + np.maximum(columns - width + r, 0))
    return best[size], choices


def _traced_back(by_mode, choices, size, p2p, in_flight) -> StageSplit:
    modes, bounds, picked, j = list(by_mode), [], [], size
    for k in range(len(choices) - 1, -1, -1):
        mode_index, i = divmod(int(choices[k][j]), size + 1)
        bounds.append((i, j))
        picked.append(modes[mode_index])
        j = i
    return _describe(by_mode, bounds[::-1], p2p, in_flight, tuple(picked[::-1]))


def _describe(by_mode, bounds, p2p, in_flight, modes=None) -> StageSplit:
    """The split's stage times and memory; `by_mode` a list of units (one mode) or a dict."""
    if not isinstance(by_mode, dict):
        by_mode, modes = {"none": by_mode}, ("none",) * len(bounds)
    units = [by_mode[mode] for mode in modes]
    stages = list(zip(units, bounds, strict=True))
    return StageSplit(
        tuple(bounds),
        tuple(_stage_cost(us, i, j, p2p) for us, (i, j) in stages),
        tuple(_stage_memory(us, i, j, in_flight(k)) for k, (us, (i, j)) in enumerate(stages)),
        tuple(modes),
        tuple(_stage_p2p(us, i, j, p2p) for us, (i, j) in stages),
    )


def best_split_brute_force(units, num_stages, p2p, in_flight, budget) -> StageSplit:
    """Every split, for checking the DP on small cases."""
    best = None
    for cuts in itertools.combinations(range(1, len(units)), num_stages - 1):
        edges = (0, *cuts, len(units))
        bounds = list(zip(edges, edges[1:], strict=False))
        split = _describe(units, bounds, p2p, in_flight)
        if any(m > budget for m in split.stage_memory):
            continue
        if best is None or split.slowest_s < best.slowest_s:
            best = split
    if best is None:
        raise ValueError("no split fits the memory budget")
    return best


def equal_bounds(num_units: int, num_stages: int) -> list[tuple[int, int]]:
    """The hand-tuned default: blocks shared out equally (remainder to the first stages),
    the prologue (unit 0) on the first stage and the epilogue (the last unit) on the last."""
    size, extra = divmod(num_units - 2, num_stages)
    bounds, start = [], 0
    for k in range(num_stages):
        end = 1 + sum(size + (1 if s < extra else 0) for s in range(k + 1))
        bounds.append((start, num_units if k == num_stages - 1 else end))
        start = end
    return bounds


def equal_layer_split(units, num_stages, p2p, in_flight) -> StageSplit:
    """`equal_bounds` as a split of `units`."""
    return _describe(units, equal_bounds(len(units), num_stages), p2p, in_flight)
