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
    time_s: float  # forward + backward of one microbatch
    param_bytes: float  # parameters, gradients and optimizer state
    activation_bytes: float  # kept for backward, one microbatch
    out_bytes: float  # what crosses to the next unit, one microbatch


@dataclass(frozen=True)
class StageSplit:
    bounds: tuple[tuple[int, int], ...]  # [i, j) unit ranges, one per stage
    stage_times: tuple[float, ...]
    stage_memory: tuple[float, ...]

    @property
    def slowest_s(self) -> float:
        return max(self.stage_times)


def _stage_cost(units, i, j, p2p: Callable[[float], float]) -> float:
    inbound = p2p(units[i - 1].out_bytes) if i > 0 else 0.0
    outbound = p2p(units[j - 1].out_bytes) if j < len(units) else 0.0
    return sum(u.time_s for u in units[i:j]) + inbound + outbound


def _stage_memory(units, i, j, in_flight: float) -> float:
    return sum(u.param_bytes + in_flight * u.activation_bytes for u in units[i:j])


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


def best_split(units, num_stages, p2p, in_flight: Callable[[int], float], budget) -> StageSplit:
    """Minimize the slowest stage under each stage's memory budget (ValueError if none fits).

    best[k][j] is the slowest stage of the best split of units [0, j) into k stages;
    best[k][j] = min_i max(best[k-1][i], cost[i, j]) over memory-feasible [i, j).
    """
    cost = _cost_table(units, p2p)
    params = _range_table(np.array([u.param_bytes for u in units]))
    activations = _range_table(np.array([u.activation_bytes for u in units]))
    best = np.full(len(units) + 1, INFEASIBLE)
    best[0] = 0.0
    choices = []
    for k in range(num_stages):
        fits = params + in_flight(k) * activations <= budget
        candidates = np.where(fits, np.maximum(best[:, None], cost), INFEASIBLE)
        choices.append(np.argmin(candidates, axis=0))
        best = candidates.min(axis=0)
    if best[len(units)] == INFEASIBLE:
        raise ValueError("no split fits the memory budget")
    bounds, j = [], len(units)
    for k in range(num_stages - 1, -1, -1):
        i = int(choices[k][j])
        bounds.append((i, j))
        j = i
    bounds.reverse()
    return _describe(units, bounds, p2p, in_flight)


def _describe(units, bounds, p2p, in_flight) -> StageSplit:
    return StageSplit(
        tuple(bounds),
        tuple(_stage_cost(units, i, j, p2p) for i, j in bounds),
        tuple(_stage_memory(units, i, j, in_flight(k)) for k, (i, j) in enumerate(bounds)),
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
