"""Run a function on real torch.distributed (gloo) processes and collect what each returns.

    results = run_distributed(worker, 2, arg)   # worker(rank, world_size, arg) on 2 processes

Workers must be module-level functions (spawn re-imports their module) and
return something picklable. Each run takes a free port, every process gets a
collective timeout, the parent joins with a deadline and kills stragglers, and
the first worker exception is re-raised in the parent with its traceback text.
"""

from __future__ import annotations

import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A worker process raised; the message holds its rank and traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, timeout_s, results, worker_fn, args) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        value = worker_fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(worker_fn, world_size: int, *args, timeout_s: float = 120) -> list:
    """Run `worker_fn(rank, world_size, *args)` on `world_size` gloo processes; results by rank."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(
            target=_entry,
            args=(rank, world_size, port, timeout_s, results, worker_fn, args),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    finished = False
    try:
        values = _collect(results, processes, timeout_s)
        finished = True
        return values
    finally:
        _stop(processes, grace_s=10 if finished else 0)


def _collect(results, processes, timeout_s: float) -> list:
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    while len(values) < len(processes):
        try:
            rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            missing = sorted(set(range(len(processes))) - set(values))
            raise WorkerError(f"ranks {missing} gave no result within {timeout_s} s") from None
        if not ok:
            raise WorkerError(f"rank {rank} failed:\n{value}")
        values[rank] = value
    return [values[rank] for rank in range(len(processes))]


def _stop(processes, grace_s: float) -> None:
    """Join within `grace_s` (0 after a failure: the others may wait in a collective), then kill."""
    for process in processes:
        process.join(timeout=grace_s)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
