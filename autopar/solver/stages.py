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
    """band[r, j] = max(values[i:j]) for i = max(j - width + r, 0) (0 where j = 0), from a
    sparse table of maxima over power-of-two runs: a window is two overlapping runs, so the
    whole band takes O(log width) array operations, not one per stage length."""
    n = len(values)
    table = [np.asarray(values, dtype=float)]
    while 2 ** len(table) <= width:
        half, previous = 2 ** (len(table) - 1), table[-1]
        table.append(np.maximum(previous, np.concatenate([previous[half:], previous[-half:]])))
    ends = np.arange(n + 1)[None, :]
    starts = np.maximum(ends - (width - np.arange(width))[:, None], 0)
    lengths = ends - starts
    level = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    stacked = np.stack(table) if n else np.zeros((1, 0))
    first = stacked[level, np.minimum(starts, n - 1)] if n else np.zeros_like(lengths, float)
    second = stacked[level, np.clip(ends - 2**level, 0, n - 1)] if n else first
    return np.where(lengths > 0, np.maximum(first, second), 0.0)


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


def _split_bound(by_mode, bounds, p2p, in_flight, budget) -> float:
    """The slowest stage of the split `bounds`, each stage in its fastest mode that fits:
    a split the DP may beat but never lose to (+inf when a stage fits in no mode)."""
    slowest = 0.0
    for k, (i, j) in enumerate(bounds):
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


def _greedy_ends(by_mode, num_stages, in_flight, budget, keep_one: bool) -> list[int]:
    """Where each stage ends when each, first to last, takes as many units as fit in its
    best mode (`keep_one`: leaving one unit for each stage after it). A stage's memory only
    grows with its units, so uncapped, stage by stage, this reaches at least as far as
    every split that fits (a stage may take none, a later one with fewer microbatches in
    flight may fit it): if the last end falls short of the units, no split fits."""
    modes = list(by_mode.values())
    size, start, ends = len(modes[0]), 0, []
    for k in range(num_stages):
        limit = size - (num_stages - 1 - k) if keep_one else size
        end, alive = start, in_flight(k)
        for units in modes:
            kept = transient = 0.0
            j = start
            while j < limit:
                unit = units[j]
                kept += unit.param_bytes + alive * unit.activation_bytes
                transient = max(transient, unit.transient_bytes)
                if kept + transient > budget:
                    break
                j += 1
            end = max(end, j)
        ends.append(end)
        start = end
    return ends


def _fitting_bound(by_mode, num_stages, p2p, in_flight, budget) -> float:
    """The slowest stage of a split that fits: the equal split, or else the greedy one
    (each stage as many units as fit), whichever is faster; +inf if neither fits."""
    size = len(next(iter(by_mode.values())))
    equal = INFEASIBLE
    if size - 2 >= num_stages:
        equal = _split_bound(by_mode, equal_bounds(size, num_stages), p2p, in_flight, budget)
    ends = _greedy_ends(by_mode, num_stages, in_flight, budget, keep_one=True)
    starts = [0, *ends[:-1]]
    if ends[-1] != size or any(i == j for i, j in zip(starts, ends, strict=True)):
        return equal
    greedy = _split_bound(by_mode, list(zip(starts, ends, strict=True)), p2p, in_flight, budget)
    return min(equal, greedy)


def best_split(units, num_stages, p2p, in_flight: Callable[[int], float], budget) -> StageSplit:
    """Minimize the slowest stage under each stage's memory budget (ValueError if none fits).

    `units` is one list, or a dict mode -> list (same boundaries) of which each stage
    then takes the fastest mode that fits it. best[k][j] is the slowest stage of the best
    split of units [0, j) into k stages; best[k][j] = min_{i, mode} max(best[k-1][i],
    cost_mode[i, j]) over memory-feasible [i, j).

    Only stages no slower than a fitting split's slowest can be in the answer, so the DP
    runs over stages at most `width` units long: a band of the (i, j) table, rows
    r = i - j + width, built in time linear in the units for a given width, whose argmin
    picks what the whole table's would.
    """
    by_mode = units if isinstance(units, dict) else {"none": units}
    size = len(next(iter(by_mode.values())))
    if size < num_stages or _greedy_ends(by_mode, num_stages, in_flight, budget, False)[-1] < size:
        raise ValueError("no split fits the memory budget")
    bound = _fitting_bound(by_mode, num_stages, p2p, in_flight, budget) * (1 + 1e-9)
    width = min(_widest_stage(by_mode, bound), size)
    best, choices = _banded_dp(by_mode, num_stages, p2p, in_flight, budget, width, bound)
    if best > bound and width < size:  # rounding at the bound's edge: the whole table
        best, choices = _banded_dp(by_mode, num_stages, p2p, in_flight, budget, size)
    if best == INFEASIBLE:
        raise ValueError("no split fits the memory budget")
    return _traced_back(by_mode, choices, size, p2p, in_flight)


def _stage_ends(by_mode, num_stages: int, bound: float) -> list[tuple[int, int]]:
    """Per stage k, the range [lo, hi] of units [0, j) the first k + 1 stages can end at in
    a split whose stages all cost at most `bound`: no stage costs less than its units'
    fastest time, so greedy stages of that time from the left reach at most hi, and from
    the right leave at least lo (every stage holding a unit)."""
    size = len(next(iter(by_mode.values())))
    fastest = np.min([[u.time_s for u in units] for units in by_mode.values()], axis=0)
    prefix = np.concatenate([[0.0], np.cumsum(fastest)])
    reach, his = 0, []
    for _ in range(num_stages):
        reach = int(np.searchsorted(prefix, prefix[reach] + bound, side="right")) - 1
        his.append(reach)
    start, los = size, [size]
    for _ in range(num_stages - 1):
        start = int(np.searchsorted(prefix, prefix[start] - bound, side="left"))
        los.append(start)
    los = los[::-1]  # los[k]: the least end of stage k
    return [
        (max(los[k], k + 1), min(his[k], size - (num_stages - 1 - k))) for k in range(num_stages)
    ]


def _banded_dp(by_mode, num_stages, p2p, in_flight, budget, width, bound=INFEASIBLE):
    """The DP over stages of at most `width` units, each costing at most `bound`, whose
    ends lie where such stages can end (`_stage_ends`: a few units per stage for blocks of
    equal cost, so the work grows with the units, not their square): the slowest stage of
    the best split and each step's choices (mode * (size + 1) + i for every end j)."""
    size = len(next(iter(by_mode.values())))
    bands = [_Band.of(us, p2p, width) for us in by_mode.values()]
    band_cost, params, activations, transient = (
        np.stack([getattr(band, part) for band in bands])  # (mode, r, j)
        for part in ("cost", "params", "activations", "transient")
    )
    columns = np.arange(size + 1)
    start_of = np.maximum(columns[None, :] - width + np.arange(width)[:, None], 0)  # cell -> i
    full = [(k + 1, size - (num_stages - 1 - k)) for k in range(num_stages)]
    ends = _stage_ends(by_mode, num_stages, bound) if bound < INFEASIBLE else full
    best = np.full(size + 1, INFEASIBLE)
    best[0] = 0.0
    choices = []
    for k, (lo, hi) in enumerate(ends):
        found, choice = np.full(size + 1, INFEASIBLE), np.zeros(size + 1, dtype=int)
        if lo <= hi:
            window = slice(lo, hi + 1)
            memory = (params[:, :, window] + in_flight(k) * activations[:, :, window]
                      + transient[:, :, window])  # fmt: skip
            fits = np.where(memory <= budget, band_cost[:, :, window], INFEASIBLE)
            before = best[start_of[:, window]]  # best[i] of each cell (i < 0: +inf)
            flat = np.maximum(before[None], fits).reshape(-1, hi + 1 - lo)
            picked = np.argmin(flat, axis=0)
            found[window] = flat[picked, np.arange(hi + 1 - lo)]
            mode, r = np.divmod(picked, width)
            choice[window] = mode * (size + 1) + np.maximum(columns[window] - width + r, 0)
        best = found
        choices.append(choice)
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
        end = 1 + (k + 1) * size + min(k + 1, extra)
        bounds.append((start, num_units if k == num_stages - 1 else end))
        start = end
    return bounds


def equal_layer_split(units, num_stages, p2p, in_flight) -> StageSplit:
    """`equal_bounds` as a split of `units`."""
    return _describe(units, equal_bounds(len(units), num_stages), p2p, in_flight)
