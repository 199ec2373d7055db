"""Run a function on N local gloo processes and collect what each returns.

    results = run_local(worker, 8, arg)   # worker(rank, world_size, arg) on 8 processes

The demo, `autopar calibrate` and the tests use it. Workers must be module-level
functions (spawn re-imports their module) and return something picklable. Each run
takes a free port, every process gets a collective timeout, the parent waits with a
deadline and kills stragglers, and one `LaunchError` names every rank that failed
(with its traceback text), died without a result (its exit code) or stayed silent.
A worker may call `report(text)` to show progress: the parent's `on_message(text)`
gets it while the run goes on. With `backend="nccl"` rank r uses GPU r.
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


class LaunchError(RuntimeError):
    """A local rank raised, died or stayed silent; the message says which and why."""


_MESSAGES = None  # in a worker: the queue `report` writes to


def report(text: str) -> None:
    """From a worker: show `text` as progress in the parent (nothing outside `run_local`)."""
    if _MESSAGES is not None:
        _MESSAGES.put(text)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, timeout_s, results, messages, backend, worker_fn, args):
    global _MESSAGES
    _MESSAGES = messages
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
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


def run_local(
    worker_fn,
    world_size: int,
    *args,
    timeout_s: float = 120,
    failure_grace_s: float = 10,
    collective_timeout_s: float | None = None,
    backend: str = "gloo",
    on_message=None,
) -> list:
    """Run `worker_fn(rank, world_size, *args)` on `world_size` processes; results by rank.

    `timeout_s` bounds the whole run, `collective_timeout_s` (default: the same) every
    collective. Once a rank fails or dies, the others get `failure_grace_s` more to
    report (they usually fail at once, their peer gone); then one `LaunchError` lists
    every failure, death and silent rank. `on_message(text)` receives what workers
    `report`.
    """
    context = mp.get_context("spawn")
    results, messages = context.Queue(), context.Queue()
    port = free_port()
    timeout = collective_timeout_s or timeout_s
    processes = [
        context.Process(
            target=_entry,
            args=(rank, world_size, port, timeout, results, messages, backend, worker_fn, args),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    finished = False
    try:
        relay = (lambda: _relay(messages, on_message)) if on_message else (lambda: None)
        values = _collect(results, processes, timeout_s, failure_grace_s, relay)
        finished = True
        return values
    finally:
        _stop(processes, grace_s=10 if finished else 0)


def _relay(messages, on_message) -> None:
    while True:
        try:
            on_message(messages.get_nowait())
        except queue.Empty:
            return


def _collect(results, processes, timeout_s: float, failure_grace_s: float, relay) -> list:
    values: dict[int, object] = {}
    problems: dict[int, str] = {}  # rank -> what went wrong
    deadline = time.monotonic() + timeout_s
    while len(values) + len(problems) < len(processes) and time.monotonic() < deadline:
        relay()
        had_problems = bool(problems)
        try:
            rank, ok, value = results.get(timeout=0.2)
        except queue.Empty:
            _note_deaths(processes, values, problems)
        else:
            if ok:
                values[rank] = value
            else:
                problems[rank] = f"rank {rank} failed:\n{value}"
        if problems and not had_problems:
            deadline = min(deadline, time.monotonic() + failure_grace_s)
    if problems or len(values) < len(processes):
        silent = sorted(set(range(len(processes))) - set(values) - set(problems))
        lines = [problems[rank] for rank in sorted(problems)]
        if silent:
            lines.append(f"ranks {silent} gave no result within the time allowed")
        raise LaunchError("\n".join(lines))
    return [values[rank] for rank in range(len(processes))]


def _note_deaths(processes, values, problems) -> None:
    """A process that exited non-zero without a result has died (os._exit, a signal, OOM)."""
    for rank, process in enumerate(processes):
        if rank in values or rank in problems or process.is_alive():
            continue
        if process.exitcode not in (None, 0):
            problems[rank] = f"rank {rank} exited with code {process.exitcode} without a result"


def _stop(processes, grace_s: float) -> None:
    """Join within `grace_s` (0 after a failure: the others may wait in a collective), then kill."""
    for process in processes:
        process.join(timeout=grace_s)
    for process in processes:
        if process.is_alive():
            process.kill()
