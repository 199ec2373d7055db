"""What each collective kind costs among groups of local ranks: times, then an alpha-beta fit.

For a world of w ranks and a group size g dividing it, the w ranks form w / g groups
and all of them run the collective at once, as the tp or dp groups of a plan do.
Collectives run through the runtime's own code (`ops.collectives.run_steps`, with
its fallbacks where the backend lacks an op, and the pipeline's blocking send and
receive), so what is timed is what a plan runs. Each kind is timed at a few sizes
and fitted to `cost.comm`'s model, t = steps * latency + factor * S / bus_bw.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from autopar.calibrate.timing import synchronize
from autopar.cost.comm import bus_factor, latency_steps
from autopar.ops.axes import Axis
from autopar.ops.collectives import run_steps
from autopar.reshard import Step

_STEPS = {
    "all_reduce": Step("all_reduce"),
    "all_gather": Step("all_gather", dim=0),
    "reduce_scatter": Step("reduce_scatter", dim=0),
    "all_to_all": Step("all_to_all", dim=0, to_dim=1),
}
BURST_MATMULS = 8  # about a millisecond of compute before each collective
COLUMNS = 16  # per rank of the group: the width of a tensor timed (rows carry the size)


def group_sizes(world: int) -> list[int]:
    """The group sizes a plan on `world` ranks can use (divisors above one)."""
    return [g for g in range(2, world + 1) if world % g == 0]


def time_collectives(world: int, group_size: int, kinds, message_bytes, repeats: int, device):
    """On every rank of the default group: this rank's median seconds per (kind, bytes),
    the first ranks of `world` running `kinds` in groups of `group_size` at once (a
    rank left over, and every rank from `world` on, waits). Every rank must call it:
    groups are made collectively."""
    rank, used = dist.get_rank(), world // group_size * group_size
    groups = [dist.new_group(list(range(s, s + group_size))) for s in range(0, used, group_size)]
    axis = None
    if rank < used:
        axis = Axis("calibrate", groups[rank // group_size], group_size, rank % group_size)
    found = {}
    for kind in kinds:
        for nbytes in message_bytes:
            run = _runner(kind, nbytes, axis, rank, group_size, device) if axis else None
            found[(kind, nbytes)] = _timed(run, repeats, device)
    return found


def _runner(kind, nbytes, axis, rank, group_size, device):
    """A call that runs one `kind` collective of `nbytes` (the full tensor) on this rank."""
    columns = COLUMNS * group_size  # all_to_all scatters them
    rows = max(group_size, nbytes // (4 * columns) // group_size * group_size)
    local_rows = (
        rows if kind in ("all_reduce", "reduce_scatter", "send_recv") else rows // group_size
    )
    x = torch.ones(local_rows, columns, device=device)
    if kind == "send_recv":
        if rank % 2 == 0:
            return lambda: dist.send(x, dst=rank + 1)
        return lambda: dist.recv(x, src=rank - 1)
    steps = (_STEPS[kind],)
    return lambda: run_steps(x, steps, axis)


def _timed(run, repeats: int, device) -> float | None:
    """Median seconds of `run` over `repeats`, on every rank at once; None on a rank that
    only waits. Each call follows a short burst of compute, as a collective in a training
    step follows the ops before it: gloo's threads are then asleep and must wake, which
    costs more than a collective issued straight after another."""
    a = torch.randn(128, 128, device=device)
    dist.barrier()
    times = []
    for i in range(repeats + 1):  # the first sets up buffers
        if run is None:
            continue
        for _ in range(BURST_MATMULS):
            torch.mm(a, a)
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    dist.barrier()
    return statistics.median(times) if run is not None else None


def fit_alpha_beta(kind: str, num_ranks: int, points: list[tuple[float, float]]) -> dict:
    """Bus bandwidth and per-step latency from (bytes, seconds) points, least squares on
    t = a + b * S with a, b >= 0. When noise hides the size dependence (no positive
    slope), all of the largest message's time is put on bandwidth and all of the
    smallest one's on latency: both pessimistic bounds, recorded as `fit: "bounds"`."""
    sizes, times = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    factor, steps = bus_factor(kind, num_ranks), latency_steps(kind, num_ranks)
    slope, intercept = np.polyfit(sizes, times, 1) if len(set(sizes)) > 1 else (0.0, 0.0)
    if slope > 0:
        if intercept < 0:  # through the origin instead
            slope, intercept = float(sizes @ times / (sizes @ sizes)), 0.0
        bus_bw, latency, fit = factor / slope, intercept / steps, "least-squares"
    else:
        big, small = int(np.argmax(sizes)), int(np.argmin(sizes))
        bus_bw, latency = factor * sizes[big] / times[big], times[small] / steps
        fit = "bounds"
    return {"bus_bw": float(bus_bw), "latency": float(latency), "fit": fit,
            "points": [[float(s), float(t)] for s, t in zip(sizes, times, strict=True)]}  # fmt: skip
