"""The calibration profile on disk: where it lives, what it must hold, how it is read.

`autopar calibrate` (autopar/calibrate/) measures this machine and writes the file;
`Mesh.local` and `Mesh.from_profile` read it through `local_constants`. Kept apart
from the measuring so that the topology (mesh.py) reads a profile without importing
torch.distributed or the local launcher.

A profile (version 5) holds, for every world size w it measured (1..N), what a rank
sees while w ranks run at once: its compute constants (`COMPUTE_KEYS`) per CPU second
of the rank (calibrate/timing.py says why) and, for w > 1, an alpha-beta fit per
collective kind and group size (`FIT_KEYS`), every group of that size busy at the
same time, in wall seconds. `local_constants` turns the compute constants into wall
rates by the share of a core each of the w ranks gets (`cost.sharing.core_share`):

    {"version": 4, "backend": "gloo", "world_size": 4, "cores": 2, ...,
     "worlds": {"2": {"compute": {"matmul_flops": ..., ...},
                      "collectives": {"all_reduce": {"2": {"bus_bw": ..., "latency": ...}}}}}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from autopar.cost.sharing import core_share
from autopar.errors import AutoparError

CALIBRATION_VERSION = 5
# What a rank's compute costs (per rank, while the world's ranks all run): the cost
# model's roofline rates and its per-node overheads (cost/compute.py, cost/overheads.py).
# per second: scale with the core share (the optimizer's: AdamW's traffic as torch.optim
# runs it, in place, cost/compute.py's `optimizer_seconds`)
RATE_KEYS = ("matmul_flops", "memory_bandwidth", "optimizer_bandwidth")
SECONDS_KEYS = ("op_overhead_s", "backward_op_overhead_s")  # seconds: divide by it
COMPUTE_KEYS = RATE_KEYS + SECONDS_KEYS
# [logits bytes, seconds per byte] of the loss at a few sizes (cost/loss.py): divide too
LOSS_KEY = "loss_seconds_per_byte"
FIT_KEYS = ("bus_bw", "latency")


@dataclass(frozen=True)
class LocalConstants:
    """Everything `Mesh.local(world_size)` needs, for one world size of this machine."""

    world_size: int
    compute: dict[str, float]  # COMPUTE_KEYS per wall second, `world_size` ranks busy
    idle_speedup: float  # how much faster a rank computes while its peers wait (>= 1)
    collectives: dict[tuple[str, int], tuple[float, float]]  # (kind, ranks) -> (bus_bw, latency)
    memory_bytes: int  # the machine's, all ranks together
    source: str  # for Mesh.describe: "calibrated" and the file
    cpu_ranks: bool = True  # ranks compute on CPU cores (gloo), not a GPU each


def default_calibration_path() -> Path:
    """Where `autopar calibrate` writes and `Mesh.local` looks by default."""
    return Path.home() / ".cache" / "autopar" / "calibration.json"


def load_calibration(path: str | os.PathLike) -> dict:
    """Read a calibration file, checking that it is a current profile with numbers."""
    path = Path(path)
    hint = f"rerun `autopar calibrate --out {path}` or delete it"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AutoparError(f"no calibration file at {path}; run `autopar calibrate`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutoparError(f"cannot read calibration file {path}: {exc}; {hint}") from None
    if not isinstance(data, dict):
        raise AutoparError(f"calibration file {path} holds no JSON object; {hint}")
    if data.get("version") != CALIBRATION_VERSION:
        raise AutoparError(
            f"calibration file {path} has version {data.get('version')!r}, this autopar reads "
            f"version {CALIBRATION_VERSION}; {hint}"
        )
    bad = _problems(data)
    if bad:
        raise AutoparError(f"calibration file {path} lacks valid values for {bad}; {hint}")
    return data


def local_constants(data: dict, world_size: int, source: str) -> LocalConstants:
    """The constants of `world_size` ranks from a loaded profile (AutoparError when the
    profile did not measure that many)."""
    worlds = data["worlds"]
    if str(world_size) not in worlds:
        measured = sorted(int(w) for w in worlds)
        raise AutoparError(
            f"the calibration {source} measured {measured[0]}..{measured[-1]} local ranks, not "
            f"{world_size}; run `autopar calibrate --world-size {world_size}`"
        )
    world, cores = worlds[str(world_size)], int(data["cores"])
    cpu_ranks = data.get("compute_clock") != "wall"
    if not cpu_ranks:  # GPUs: each rank has its own device
        cores = max(cores, world_size)
    compute = wall_compute(world["compute"], world_size, cores)
    alone = min(world_size, max(cores, 1))  # as many ranks as cores: each has its own
    busiest = wall_compute(worlds[str(alone)]["compute"], alone, cores)
    speedup = busiest["matmul_flops"] / compute["matmul_flops"]
    fits = {
        (kind, int(ranks)): (fit["bus_bw"], fit["latency"])
        for kind, by_ranks in world.get("collectives", {}).items()
        for ranks, fit in by_ranks.items()
    }
    return LocalConstants(
        world_size=world_size, compute=compute,
        idle_speedup=max(speedup, 1.0), collectives=fits,
        memory_bytes=int(data["memory_bytes"]), source=source, cpu_ranks=cpu_ranks,
    )  # fmt: skip


def wall_compute(per_cpu_second: dict, ranks: int, cores: int) -> dict:
    """A rank's compute constants per wall second while `ranks` ranks share `cores`."""
    share = core_share(ranks, cores)
    rates = {k: float(per_cpu_second[k]) * share for k in RATE_KEYS}
    seconds = {k: float(per_cpu_second[k]) / share for k in SECONDS_KEYS}
    loss = tuple((float(n), float(s) / share) for n, s in per_cpu_second[LOSS_KEY])
    return rates | seconds | {LOSS_KEY: loss}


def physical_memory_bytes() -> int:
    """Installed RAM of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _problems(data: dict) -> list[str]:
    """The keys of `data` that are missing or not non-negative numbers."""
    bad = [k for k in ("memory_bytes", "cores") if not _is_number(data.get(k))]
    worlds = data.get("worlds")
    if not isinstance(worlds, dict) or not worlds:
        return [*bad, "worlds"]
    for w, world in worlds.items():
        compute = world.get("compute") if isinstance(world, dict) else None
        if not isinstance(compute, dict):
            bad.append(f"worlds.{w}.compute")
            continue
        bad += [f"worlds.{w}.compute.{k}" for k in COMPUTE_KEYS if not _is_number(compute.get(k))]
        bad += [f"worlds.{w}.compute.matmul_flops"] * (compute.get("matmul_flops") == 0)
        bad += [f"worlds.{w}.compute.{LOSS_KEY}"] * (not _is_curve(compute.get(LOSS_KEY)))
        for kind, by_ranks in (world.get("collectives") or {}).items():
            for ranks, fit in by_ranks.items():
                where = f"worlds.{w}.collectives.{kind}.{ranks}"
                bad += [f"{where}.{k}" for k in FIT_KEYS if not _is_number(fit.get(k))]
                bad += [f"{where}.bus_bw"] * (fit.get("bus_bw") == 0)
    return bad


def _is_curve(points) -> bool:
    """A non-empty list of [size, value] pairs of positive numbers."""
    return (
        isinstance(points, list) and bool(points)
        and all(isinstance(p, list) and len(p) == 2 and all(_is_number(v) and v > 0 for v in p)
                for p in points)
    )  # fmt: skip


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
