"""Measure this machine's constants so that `Mesh.local` prices what really runs here.

Datasheet numbers describe GPUs; the ranks of a CPU machine have no datasheet, so
`autopar calibrate` measures them and writes a profile (profile.py describes it;
default path ~/.cache/autopar/calibration.json) that `Mesh.local(world_size)` and
`Mesh.from_profile(path)` read. One launch of N ranks measures, for every world size
w = 1..N, what a rank sees while w of them run at once (ranks sharing cores are
measured as they run):

- compute (compute.py): per-node overheads, matmul FLOP/s on transformer shapes,
  memory bandwidth of a block's elementwise ops;
- collectives (collectives.py), for w > 1: every kind, every group size dividing w,
  all groups busy at once, fitted to the alpha-beta model of `cost.comm`.

With the default sizes it takes about a minute on 4 ranks of a 2-core machine.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from autopar.calibrate.collectives import fit_alpha_beta, group_sizes, time_collectives
from autopar.calibrate.compute import ComputeSizes, measure_compute
from autopar.cost.comm import COLLECTIVE_KINDS
from autopar.errors import AutoparError
from autopar.fileio import write_atomic
from autopar.launch import LaunchError, report, run_local
from autopar.profile import CALIBRATION_VERSION, default_calibration_path, physical_memory_bytes

BACKENDS = ("gloo", "nccl")
JOIN_TIMEOUT_S = 600.0
GROUP_KINDS = tuple(k for k in COLLECTIVE_KINDS if k != "send_recv")


@dataclass(frozen=True)
class CalibrationSizes:
    """What to measure with; tests pass tiny ones."""

    compute: ComputeSizes = field(default_factory=ComputeSizes)
    message_bytes: tuple[int, ...] = (4 * 2**10, 2**20, 8 * 2**20)
    repeats: int = 20


def calibrate(
    world_size: int = 4,
    sizes: CalibrationSizes = CalibrationSizes(),  # noqa: B008 - frozen, safe to share
    out_path: str | os.PathLike | None = None,
    backend: str = "gloo",
    progress=None,
) -> dict:
    """Measure 1..`world_size` ranks, write the profile and return its contents;
    `progress(text)` hears each phase."""
    if world_size < 2:
        raise AutoparError(
            f"calibrate(world_size={world_size}): measuring a collective needs at least 2 ranks"
        )
    if backend not in BACKENDS:
        raise AutoparError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise AutoparError(
            f"nccl calibration of {world_size} ranks needs {world_size} GPUs; this machine "
            f"has {torch.cuda.device_count()}: pass --world-size or --backend gloo"
        )
    start = time.perf_counter()
    try:
        ranks = run_local(
            _worker, world_size, sizes, timeout_s=JOIN_TIMEOUT_S, backend=backend,
            on_message=progress,
        )  # fmt: skip
    except LaunchError as error:
        raise AutoparError(
            f"calibration on {world_size} {backend} ranks failed: {error}"
        ) from error
    result = {
        "version": CALIBRATION_VERSION,
        "backend": backend,
        "world_size": world_size,
        "cores": _cores(),
        "threads_per_rank": 1,
        "compute_clock": "cpu" if backend == "gloo" else "wall",
        "dtype_bytes": 4,
        "torch_version": torch.__version__,
        "memory_bytes": physical_memory_bytes(),
        "sizes": asdict(sizes),
        "worlds": _worlds(ranks, world_size, sizes),
        "elapsed_s": time.perf_counter() - start,
    }
    path = Path(out_path) if out_path is not None else default_calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2) + "\n")
    return result


def _cores() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _worker(rank: int, world_size: int, sizes: CalibrationSizes) -> dict:
    """One rank: compute with 1..N ranks busy, then collectives for worlds 2..N."""
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    compute = {}
    for world in range(1, world_size + 1):
        if rank == 0:
            report(f"compute, {world} of {world_size} ranks busy")
        dist.barrier()
        if rank < world:
            compute[world] = measure_compute(sizes.compute, device, torch.float32)
        dist.barrier()
    collectives = {}
    for world in range(2, world_size + 1):
        if rank == 0:
            report(f"collectives on {world} ranks")
        for group in group_sizes(world):
            found = time_collectives(
                world, group, GROUP_KINDS, sizes.message_bytes, sizes.repeats, device
            )
            collectives.update({(world, group, *key): s for key, s in found.items()})
        found = time_collectives(
            world, 2, ("send_recv",), sizes.message_bytes, sizes.repeats, device
        )
        collectives.update({(world, 2, *key): s for key, s in found.items()})
    return {"compute": compute, "collectives": collectives}


def _worlds(ranks: list[dict], world_size: int, sizes: CalibrationSizes) -> dict:
    """Per world size: the active ranks' mean compute constants, and per kind and group
    size the fit through the slowest rank's times (a collective ends with its last rank)."""
    worlds = {}
    for world in range(1, world_size + 1):
        measured = [r["compute"][world] for r in ranks[:world]]
        compute = {k: _mean([m[k] for m in measured]) for k in measured[0]}
        worlds[str(world)] = {"compute": compute, "collectives": {}}
    points: dict = {}
    for key in ranks[0]["collectives"]:
        world, group, kind, nbytes = key
        slowest = max(r["collectives"][key] for r in ranks if r["collectives"][key] is not None)
        points.setdefault((world, group, kind), []).append((nbytes, slowest))
    for (world, group, kind), found in sorted(points.items()):
        fits = worlds[str(world)]["collectives"].setdefault(kind, {})
        fits[str(group)] = fit_alpha_beta(kind, group, found)
    return worlds


def _mean(values: list):
    """The ranks' mean of a number, or pointwise of [size, value] pairs (same sizes)."""
    if isinstance(values[0], list):
        return [[point[0], _mean([v[i][1] for v in values])] for i, point in enumerate(values[0])]
    return sum(values) / len(values)


def format_calibration(data: dict) -> str:
    """Human-readable lines for a calibration profile: per world size, a rank's rates and
    overheads, and each collective's bus bandwidth and latency per group size."""
    lines = [
        f"{data['backend']} on {data['cores']} cores, {data['threads_per_rank']} thread per "
        f"rank; {data['memory_bytes'] / 2**30:.1f} GiB; took {data['elapsed_s']:.1f} s; "
        f"compute per {data.get('compute_clock', 'cpu')} second of a rank"
    ]
    for world, entry in data["worlds"].items():
        c = entry["compute"]
        lines.append(
            f"{world} rank(s) busy: per rank matmul {c['matmul_flops'] / 1e9:6.1f} GFLOP/s, "
            f"memory {c['memory_bandwidth'] / 1e9:5.2f} GB/s (optimizer "
            f"{c['optimizer_bandwidth'] / 1e9:5.2f}), per node "
            f"{c['op_overhead_s'] * 1e6:4.1f} us + {c['backward_op_overhead_s'] * 1e6:4.1f} us "
            "backward; loss " + ", ".join(f"{n / 2**20:.0f} MiB {s * 2**20 * 1e3:.2f} ms/MiB"
                                         for n, s in c["loss_seconds_per_byte"])
        )  # fmt: skip
        for kind, by_group in entry["collectives"].items():
            for group, fit in by_group.items():
                lines.append(
                    f"    {kind:14s} groups of {group}: {fit['bus_bw'] / 1e9:6.3f} GB/s bus, "
                    f"{fit['latency'] * 1e6:6.1f} us per step ({fit['fit']})"
                )
    return "\n".join(lines)
