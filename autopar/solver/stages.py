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


def _range_table(values: np.ndarray) -> np.ndarray:
    """table[i, j] = sum(values[i:j]) for i < j, +inf elsewhere (not a stage)."""
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    table = prefix[None, :] - prefix[:, None]
    table[np.tril_indices(len(prefix))] = INFEASIBLE
    return table


def _cost_table(units, p2p) -> np.ndarray:
    """cost[i, j]: time of a stage holding units [i, j), its send and receive included."""
    # cut_after[c] prices the boundary after unit c - 1 (none before the first unit and
    # after the last): a stage [i, j) receives across cut i and sends across cut j
    inner = [p2p(u.out_bytes) for u in units[:-1]]
    cut_after = np.array([0.0, *inner, 0.0])
    cost = _range_table(np.array([u.time_s for u in units]))
    return cost + cut_after[:, None] + cut_after[None, :]


def _max_table(values: np.ndarray) -> np.ndarray:
    """table[i, j] = max(values[i:j]) for i < j, 0 elsewhere."""
    n = len(values)
    table = np.zeros((n + 1, n + 1))
    for i in range(n):
        table[i, i + 1 :] = np.maximum.accumulate(values[i:])
    return table


@dataclass(frozen=True)
class _Tables:
    """One recomputation mode's units as range tables: cost[i, j] and memory parts."""

    cost: np.ndarray
    params: np.ndarray
    activations: np.ndarray
    transient: np.ndarray

    @classmethod
    def of(cls, units, p2p) -> _Tables:
        return cls(
            _cost_table(units, p2p),
            _range_table(np.array([u.param_bytes for u in units])),
            _range_table(np.array([u.activation_bytes for u in units])),
            _max_table(np.array([u.transient_bytes for u in units])),
        )


def best_split(units, num_stages, p2p, in_flight: Callable[[int], float], budget) -> StageSplit:
    """Minimize the slowest stage under each stage's memory budget (ValueError if none fits).

    `units` is a list, or a dict of recomputation mode -> the units under it; each stage
    then takes the fastest mode that fits it. best[k][j] is the slowest stage of the best
    split of units [0, j) into k stages; best[k][j] = min_{i, mode} max(best[k-1][i],
    cost_mode[i, j]) over memory-feasible [i, j).
    """
    by_mode = units if isinstance(units, dict) else {"none": units}
    tables = {mode: _Tables.of(us, p2p) for mode, us in by_mode.items()}
    size = len(next(iter(by_mode.values())))
    best = np.full(size + 1, INFEASIBLE)
    best[0] = 0.0
    choices = []
    for k in range(num_stages):
        per_mode = [
            np.where(t.params + in_flight(k) * t.activations + t.transient <= budget,
                     np.maximum(best[:, None], t.cost), INFEASIBLE)
            for t in tables.values()
        ]  # fmt: skip
        stacked = np.stack(per_mode)  # (mode, i, j)
        flat = stacked.reshape(len(per_mode) * (size + 1), size + 1)
        choices.append(np.argmin(flat, axis=0))
        best = flat.min(axis=0)
    if best[size] == INFEASIBLE:
        raise ValueError("no split fits the memory budget")
    return _traced_back(by_mode, choices, size, p2p, in_flight)


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
