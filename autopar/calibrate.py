"""Measure this machine's constants so that `Mesh.local` prices what really runs here.

Datasheet numbers describe GPUs; the gloo ranks of a CPU machine have no
datasheet, so `autopar calibrate` measures them once and writes a JSON file
(`default_calibration_path()`, ~/.cache/autopar/calibration.json) that
`Mesh.local` reads:

- matmul rate: median of a few fp32 square matmuls with all threads,
- memory bandwidth: median of large tensor copies (read plus write),
- gloo all-reduce bus bandwidth and per-step latency among `world_size` spawned
  processes, fitted to the alpha-beta model of `cost.comm` from the median
  times of a small and a large message.

The whole run takes a few seconds, most of it starting the processes.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from autopar.cost.comm import bus_factor, latency_steps
from autopar.errors import AutoparError
from autopar.fileio import write_atomic
from autopar.launch import LaunchError, run_local
from autopar.profile import CALIBRATION_VERSION, default_calibration_path, physical_memory_bytes

JOIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CalibrationSizes:
    """What to measure with; tests pass tiny ones."""

    matmul_dim: int = 1024
    copy_bytes: int = 128 * 2**20
    small_message_bytes: int = 4 * 2**10
    large_message_bytes: int = 16 * 2**20
    repeats: int = 5
    small_message_repeats: int = 30  # cheap, and latency is the noisiest number


def calibrate(
    world_size: int = 2,
    sizes: CalibrationSizes = CalibrationSizes(),  # noqa: B008 - frozen, safe to share
    out_path: str | os.PathLike | None = None,
) -> dict:
    """Measure this machine, write the JSON calibration file and return its contents."""
    if world_size < 2:
        raise AutoparError(
            f"calibrate(world_size={world_size}): measuring a collective needs at least 2 ranks"
        )
    start = time.perf_counter()
    result = {
        "version": CALIBRATION_VERSION,
        "backend": "gloo",
        "world_size": world_size,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "matmul_flops": measure_matmul_flops(sizes.matmul_dim, sizes.repeats),
        "memory_bandwidth": measure_memory_bandwidth(sizes.copy_bytes, sizes.repeats),
        "memory_bytes": physical_memory_bytes(),
        **measure_allreduce(world_size, sizes),
    }
    result["elapsed_s"] = time.perf_counter() - start
    path = Path(out_path) if out_path is not None else default_calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2) + "\n")
    return result


def format_calibration(data: dict) -> str:
    """Human-readable lines for a calibration result."""
    return "\n".join(
        [
            f"matmul       {data['matmul_flops'] / 1e9:9.1f} GFLOP/s "
            f"(fp32, {data['threads']} threads)",
            f"memory copy  {data['memory_bandwidth'] / 1e9:9.2f} GB/s",
            f"all-reduce   {data['allreduce_bus_bw'] / 1e9:9.3f} GB/s bus bandwidth, "
            f"{data['allreduce_latency'] * 1e6:.1f} us per step "
            f"({data['backend']}, {data['world_size']} ranks)",
            f"memory       {data['memory_bytes'] / 2**30:9.1f} GiB",
            f"took         {data['elapsed_s']:9.1f} s",
        ]
    )


def measure_matmul_flops(dim: int, repeats: int) -> float:
    """FLOP/s of a dim x dim fp32 matmul, median over `repeats`."""
    a, b = torch.randn(dim, dim), torch.randn(dim, dim)
    seconds = _median_time(lambda: torch.mm(a, b), repeats)
    return 2 * dim**3 / seconds


def measure_memory_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a large copy, counting the read and the write."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / seconds


def measure_allreduce(world_size: int, sizes: CalibrationSizes) -> dict:
    """Run `world_size` gloo ranks, time two all-reduce sizes and fit alpha and beta."""
    try:
        times = run_local(
            _allreduce_worker, world_size, sizes, timeout_s=JOIN_TIMEOUT_S,
            collective_timeout_s=60,
        )[0]  # fmt: skip
    except LaunchError as error:
        raise AutoparError(f"all-reduce calibration failed: {error}") from error
    return fit_alpha_beta(world_size, sizes, times["small_s"], times["large_s"])


def fit_alpha_beta(
    world_size: int, sizes: CalibrationSizes, small_s: float, large_s: float
) -> dict:
    """Bus bandwidth and per-step latency through the two measured points.

    When noise hides the size dependence (the large message was not slower), all
    of the large message's time is put on bandwidth and all of the small one's
    on latency: both are then pessimistic bounds, recorded in `allreduce_fit`.
    """
    factor = bus_factor("all_reduce", world_size)
    steps = latency_steps("all_reduce", world_size)
    small, large = sizes.small_message_bytes, sizes.large_message_bytes
    if large > small and large_s > small_s:
        bus_bw = factor * (large - small) / (large_s - small_s)
        latency = max(small_s - factor * small / bus_bw, 0.0) / steps
        fit = "two-point"
    else:
        bus_bw = factor * large / large_s
        latency = small_s / steps
        fit = "bounds"
    return {
        "allreduce_bus_bw": bus_bw,
        "allreduce_latency": latency,
        "allreduce_fit": fit,
        "allreduce_small_s": small_s,
        "allreduce_large_s": large_s,
    }


def _allreduce_worker(rank: int, world_size: int, sizes: CalibrationSizes) -> dict:
    """One gloo rank: time both message sizes (every rank sees the same medians)."""
    return {
        "small_s": _time_allreduce(sizes.small_message_bytes, sizes.small_message_repeats),
        "large_s": _time_allreduce(sizes.large_message_bytes, sizes.repeats),
    }


def _time_allreduce(nbytes: int, repeats: int) -> float:
    tensor = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)

    def one() -> float:
        dist.barrier()  # start together, so the time is the collective's alone
        start = time.perf_counter()
        dist.all_reduce(tensor)
        return time.perf_counter() - start

    one()  # warm-up: the first call sets up gloo's buffers
    return statistics.median(one() for _ in range(repeats))


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return max(statistics.median(times), 1e-9)
